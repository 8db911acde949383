//! Fuzz targets: one per native function that reads network bytes. cargo-fuzz runs them
//! (native/fuzz/, `make fuzz-native`); `cargo test` runs each over a few seconds of
//! generated inputs (`make fuzz-native-short`), so CI needs no nightly toolchain. Each
//! checks that nothing panics and that what comes out is well-formed.

use std::sync::{Arc, Mutex};

use crate::datapath::{seal_tap_batch, Entry, Table};
use crate::offload::{encode_outbound, plan, Reassembler, Writes};
use crate::session::{Cipher, SessionCore};
use crate::wire::{DEFAULT_MAX_PAYLOAD, GSO_MAX_BYTES, UDP_MAX_SEGMENTS, VNET_HDR_LEN};

fn check_writes(w: &Writes) {
    for (i, &(at, n)) in w.spans.iter().enumerate() {
        assert!(at + n <= w.buf.len());
        assert!(
            n >= VNET_HDR_LEN + 14,
            "TAP write {i} shorter than vnet + Ethernet"
        );
    }
}

/// Split fuzz input into pieces: each starts with a u16 length.
fn pieces(data: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    let mut rest = data;
    while rest.len() >= 2 {
        let n = (u16::from_le_bytes([rest[0], rest[1]]) as usize).min(rest.len() - 2);
        out.push(&rest[2..2 + n]);
        rest = &rest[2 + n..];
    }
    out
}

/// `Reassembler::push_untrusted` (and flush/reset) over a sequence of inner payloads.
pub fn reassembler(data: &[u8]) {
    let mut r = Reassembler::new();
    let mut out = Writes::default();
    for p in pieces(data) {
        let before = out.spans.len();
        if r.push_untrusted(p, &mut out).is_err() {
            assert_eq!(out.spans.len(), before, "a refused payload writes nothing");
        }
        assert!(r.pending() <= crate::wire::MAX_PIECES);
    }
    r.reset(&mut out);
    assert_eq!(r.pending(), 0);
    check_writes(&out);
}

/// `plan` / `encode_outbound` and `seal_tap_batch` on TAP reads (our kernel's bytes, and
/// a peer's inside its payloads: untrusted both).
pub fn tap_reads(data: &[u8]) {
    let reads = pieces(data);
    for read in &reads {
        if let Ok(payloads) = encode_outbound(read, 1, DEFAULT_MAX_PAYLOAD) {
            assert!(payloads.iter().all(|p| p.len() <= DEFAULT_MAX_PAYLOAD));
            let mut r = Reassembler::new();
            let mut out = Writes::default();
            for p in &payloads {
                r.push_untrusted(p, &mut out)
                    .expect("our own payloads reassemble");
            }
            assert_eq!(out.spans.len(), 1, "a read comes back as one TAP write");
            assert_eq!(out.get(0)[VNET_HDR_LEN..], read[VNET_HDR_LEN..]);
        } else {
            assert!(plan(read, DEFAULT_MAX_PAYLOAD).is_err());
        }
    }
    let mut s = SessionCore::new(Cipher::ChaCha20Poly1305, &[1; 32], &[2; 32], 1, 2, true)
        .expect("valid keys");
    let mut out = Vec::new();
    let r = seal_tap_batch(
        &mut s,
        &reads,
        u32::MAX,
        DEFAULT_MAX_PAYLOAD,
        UDP_MAX_SEGMENTS,
        GSO_MAX_BYTES,
        &mut out,
    )
    .expect("counters left");
    assert_eq!(r.runs.iter().map(|run| run.1).sum::<usize>(), out.len());
    assert_eq!(s.send_counter() as usize, r.datagrams);
}

/// `SessionTable::open_batch` (header parse, lookup, window, open, reassembly) on one
/// receive call: the first byte picks the segment size, the rest is the buffer. Index 7
/// is a plain session (so random bytes can open), index 8 a secure one.
pub fn open_batch(data: &[u8]) {
    if data.is_empty() {
        return;
    }
    let segment = [0usize, 1, 16, 33, 1100, 1472][data[0] as usize % 6];
    let mut t = Table::default();
    t.peer(3).paths = vec![0];
    for (index, secure) in [(7u32, false), (8, true)] {
        let s = SessionCore::new(Cipher::Aes256Gcm, &[1; 32], &[2; 32], index, 9, secure)
            .expect("valid keys");
        let e = Entry {
            session: Arc::new(Mutex::new(s)),
            peer: 3,
        };
        t.sessions.insert(index, e);
    }
    let mut buf = data[1..].to_vec();
    let mut out = Writes::default();
    let r = t.open_batch(&mut buf, segment, 0, &mut out);
    let n = data.len() - 1;
    let mut covered = r.others.iter().map(|o| o.1).sum::<usize>();
    for &(at, len) in &r.others {
        assert!(at + len <= n);
    }
    covered += r.sessions.iter().map(|s| s.opened).sum::<usize>(); // at least one byte each
    assert!(covered <= n.max(1));
    assert_eq!(r.write_slots.len(), out.spans.len());
    assert!(r.write_slots.iter().all(|&s| s < r.sessions.len()));
    t.flush_pending(&mut out);
    check_writes(&out);
}

/// `SessionCore::open_in_place` on one datagram (secure, so only the checks run).
pub fn open_one(data: &[u8]) {
    let mut s =
        SessionCore::new(Cipher::Aes256Gcm, &[1; 32], &[2; 32], 7, 9, true).expect("valid keys");
    let mut d = data.to_vec();
    let opened = s.open_in_place(&mut d);
    assert!(opened.is_err() || data.len() >= 32);
    assert_eq!(s.recv_highest().is_some(), opened.is_ok());
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    /// Seeds: valid traffic, so mutations reach deep (pieces, rebuilt segments).
    fn seeds() -> Vec<Vec<u8>> {
        let mut seeds = Vec::new();
        for (len, v6) in [(5000, false), (3000, true), (63_000, false)] {
            let read = crate::offload::tests::build_read(len, v6, 1000, 0x18);
            let mut framed = Vec::new();
            for p in crate::offload::encode_outbound(&read, 5, 1440).unwrap() {
                framed.extend_from_slice(&(p.len() as u16).to_le_bytes());
                framed.extend_from_slice(&p);
            }
            seeds.push(framed);
            let mut reads = (read.len() as u16).to_le_bytes().to_vec();
            reads.extend_from_slice(&read);
            seeds.push(reads);
        }
        // Receive calls: plain datagrams (index 7) carrying the pieces of a super-frame,
        // one per call and as a GRO buffer of 1100-byte segments.
        let read = crate::offload::tests::build_read(9000, false, 1000, 0x18);
        let mut plain = crate::session::SessionCore::new(
            crate::session::Cipher::Aes256Gcm,
            &[0; 32],
            &[0; 32],
            9,
            7,
            false,
        )
        .unwrap();
        let mut gro = vec![4u8]; // segment 1100
        for p in crate::offload::encode_outbound(&read, 5, 1440).unwrap() {
            let mut one = vec![0u8]; // segment 0: the whole buffer
            plain.seal_parts(&mut one, &[&p]).unwrap();
            gro.extend_from_slice(&one[1..]);
            seeds.push(one);
        }
        seeds.push(gro);
        seeds.push(vec![0; 64]);
        seeds
    }

    fn run(target: fn(&[u8]), budget: Duration) -> usize {
        let mut x = 0x2545_F491_4F6C_DD1Du64;
        let mut rnd = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let seeds = seeds();
        let start = Instant::now();
        let mut n = 0;
        while start.elapsed() < budget {
            let mut d = seeds[rnd() as usize % seeds.len()].clone();
            for _ in 0..rnd() % 8 {
                let at = rnd() as usize % d.len().max(1);
                match rnd() % 4 {
                    0 if !d.is_empty() => d[at] = rnd() as u8,
                    1 => d.truncate(at),
                    2 if !d.is_empty() => d[at] ^= 1 << (rnd() % 8),
                    _ => d.insert(at.min(d.len()), rnd() as u8),
                }
            }
            target(&d);
            n += 1;
        }
        n
    }

    fn budget() -> Duration {
        let ms = std::env::var("IPOP_FUZZ_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(300);
        Duration::from_millis(ms)
    }

    /// `make fuzz-native` starts cargo fuzz from these: IPOP_FUZZ_SEEDS=DIR writes
    /// DIR/<target>/seed-N for every target.
    #[test]
    fn write_seed_corpus() {
        let Ok(dir) = std::env::var("IPOP_FUZZ_SEEDS") else {
            return;
        };
        for target in ["open_batch", "reassembler", "tap_reads", "open_one"] {
            let d = std::path::Path::new(&dir).join(target);
            std::fs::create_dir_all(&d).unwrap();
            for (i, seed) in seeds().iter().enumerate() {
                std::fs::write(d.join(format!("seed-{i}")), seed).unwrap();
            }
        }
    }

    #[test]
    fn fuzz_smoke_reassembler() {
        eprintln!("reassembler: {} inputs", run(super::reassembler, budget()));
    }

    #[test]
    fn fuzz_smoke_tap_reads() {
        eprintln!("tap_reads: {} inputs", run(super::tap_reads, budget()));
    }

    #[test]
    fn fuzz_smoke_open_batch() {
        eprintln!("open_batch: {} inputs", run(super::open_batch, budget()));
    }

    #[test]
    fn fuzz_smoke_open_one() {
        eprintln!("open_one: {} inputs", run(super::open_one, budget()));
    }
}
