#![no_main]
// The target itself lives in the crate (src/fuzzing.rs), so cargo test runs it too.
libfuzzer_sys::fuzz_target!(|data: &[u8]| ipop_trio_native::fuzzing::open_one(data));
