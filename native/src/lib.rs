//! ipop-trio's native data-path core, the Python extension `ipop_trio._native`.
//!
//! The per-datagram loop of the data path, moved out of Python: one call per batch, no
//! Python object per datagram, the GIL released while it works. The pure-Python modules are
//! the specification and the fallback (proto/session.py, proto/offload.py, the loops of
//! datapath/outbound.py and datapath/inbound.py); tests/unit/test_native_differential.py
//! holds the two to the same bytes and decisions. The Python-facing contract is written in
//! ipop_trio/datapath/native.py; in short:
//!
//! * `Session` (session.rs): keys in, never out; the send counter, the RFC 6479 window
//!   (replay.rs, 8128 counters, REJECT_AFTER_MESSAGES), the Python Session's counters.
//! * outbound (`Session.seal_tap_batch`, datapath.rs): TAP reads -> `encode_outbound`'s
//!   inner payloads (offload.rs) -> sealed datagrams back to back in one caller-owned
//!   buffer, with the GSO runs (offset, length, segment, count) to send them by.
//! * inbound (`SessionTable.open_batch`): one receive call's buffer and segment
//!   size -> header, session by receiver index, window, open, the peer's reassembler ->
//!   TAP writes in one caller-owned buffer with their offsets; per-session results for the
//!   caller's bookkeeping; drops counted by the names inbound.py gives them; datagrams that
//!   are not data handed back by offset, never dropped here.
//!
//! Layout: wire.rs (constants), replay.rs, session.rs, offload.rs, datapath.rs (the batch
//! loops, pure Rust), py.rs (the only PyO3 code: errors become `Refused`, a BadPacket,
//! or LocalProtocolError), fuzzing.rs (targets for cargo fuzz and cargo test).
//! No `unsafe` here: Python buffers are copied in and out through PyO3's safe API.
#![forbid(unsafe_code)]

pub mod datapath;
#[doc(hidden)]
pub mod fuzzing;
pub mod offload;
pub mod replay;
pub mod session;
pub mod wire;

mod py;
