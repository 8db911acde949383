//! A transport session: AEAD seal/open of data datagrams, the send counter, the replay
//! window and the counters, byte-identical to proto/session.py's `Session`.
//!
//! secure: ciphertext||tag = AEAD(send_key, nonce, payload, aad = the 16 header bytes)
//! nonce (12 bytes)        = 4 zero bytes || counter (u64, little endian)
//! plain (0xA5):             the same header and counters, the payload in clear, no tag.
//!
//! Order on receive (whitepaper §5.4.6): checks that cost no cryptography first; the replay
//! window is only *checked* before the tag verifies and only *updated* after, so a forged
//! counter never moves it.
//!
//! Keys: the AEAD is aws-lc-rs's, whose key objects hold an `EVP_AEAD_CTX` (the expanded key
//! schedule, inline) in memory AWS-LC allocated; dropping one frees it with `OPENSSL_free`,
//! which wipes the allocation (`OPENSSL_cleanse`, crypto/mem.c) before freeing. So a session's
//! keys are wiped when its `SessionCore` is dropped, with no `unsafe` here. ring keeps its key
//! schedules in plain Rust values that are not wiped on drop (it offers no way to), which is
//! why this crate moved off it; the speed is the same (native/measure.py, AES-256-GCM).

use aws_lc_rs::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey};
use aws_lc_rs::hkdf;
use zeroize::Zeroizing;

use crate::replay::{ReplayWindow, WINDOW_SIZE};
use crate::wire::{
    u32le, u64le, DATA_HEADER_SIZE, DATA_PLAIN, DATA_SECURE, REJECT_AFTER_MESSAGES, TAG_SIZE,
};

pub const KEY_SIZE: usize = 32;

/// HKDF output length of Noise's Split(): two keys.
struct TwoKeys;

impl hkdf::KeyType for TwoKeys {
    fn len(&self) -> usize {
        2 * KEY_SIZE
    }
}

/// Plain sessions: how far a counter may be from the window before it needs a second to
/// continue it (proto/session.py's PLAIN_MAX_JUMP, where the reasoning is).
pub const PLAIN_MAX_JUMP: u64 = 1 << 16;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cipher {
    Aes256Gcm,
    ChaCha20Poly1305,
}

impl Cipher {
    pub fn from_name(name: &str) -> Option<Cipher> {
        match name {
            "aes-256-gcm" => Some(Cipher::Aes256Gcm),
            "chacha20-poly1305" => Some(Cipher::ChaCha20Poly1305),
            _ => None,
        }
    }

    fn algorithm(self) -> &'static aead::Algorithm {
        match self {
            Cipher::Aes256Gcm => &aead::AES_256_GCM,
            Cipher::ChaCha20Poly1305 => &aead::CHACHA20_POLY1305,
        }
    }
}

/// Why a datagram was refused: proto/session.py's `Refusal`, same names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    Short,
    Type,
    Index,
    Limit,
    Replayed,
    TooLong,
    BadTag,
    Jump,
}

pub const REFUSALS: [Refusal; 8] = [
    Refusal::Short,
    Refusal::Type,
    Refusal::Index,
    Refusal::Limit,
    Refusal::Replayed,
    Refusal::TooLong,
    Refusal::BadTag,
    Refusal::Jump,
];

impl Refusal {
    pub fn name(self) -> &'static str {
        match self {
            Refusal::Short => "short",
            Refusal::Type => "type",
            Refusal::Index => "index",
            Refusal::Limit => "limit",
            Refusal::Replayed => "replayed",
            Refusal::TooLong => "too_long",
            Refusal::BadTag => "bad_tag",
            Refusal::Jump => "jump",
        }
    }
}

/// What building a session or sealing can refuse: the caller's mistake, never the network's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LocalError {
    KeySize,
    /// The send counter reached REJECT_AFTER_MESSAGES: rekey.
    Exhausted,
}

/// Is this datagram one `open` would even look at (length, type and pad, index)? The data
/// path's batch loop asks before it counts a datagram as this session's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fit {
    Ours(u64),
    Short,
    Type,
    Index,
}

pub struct SessionCore {
    kind: u8,
    pub local_index: u32,
    pub remote_index: u32,
    /// (seal, open) keys; None on a plain link.
    keys: Option<(LessSafeKey, LessSafeKey)>,
    send: u64,
    window: ReplayWindow,
    /// Plain sessions: the refused far counter a second may continue.
    held: Option<u64>,
    pub tx_bytes: u64,
    pub rx_bytes: u64,
    pub rx_packets: u64,
    pub refused: [u64; 8],
}

fn nonce(counter: u64) -> Nonce {
    let mut n = [0u8; 12];
    n[4..].copy_from_slice(&counter.to_le_bytes());
    Nonce::assume_unique_for_key(n)
}

impl SessionCore {
    /// The session of a completed Noise handshake, from its chaining key: Noise's `Split()`
    /// (§5.2) derives the two transport keys, here, so they never exist outside this crate.
    /// `HKDF(ck, "", 2)` of Noise §4.3 is RFC 5869 HKDF-SHA256 with salt = ck, empty IKM and
    /// empty info, 64 bytes long: T(1) carries initiator → responder, T(2) the way back. The
    /// 64 bytes live in a `Zeroizing` buffer (wiped when it goes out of scope) only until
    /// the AEAD keys are built; aws-lc-rs wipes its PRK on drop. Plain sessions derive the
    /// keys as well (the chaining key is checked the same way) and do not use them.
    pub fn from_chaining_key(
        cipher: Cipher,
        chaining_key: &[u8],
        initiator: bool,
        local_index: u32,
        remote_index: u32,
        secure: bool,
    ) -> Result<SessionCore, LocalError> {
        if chaining_key.len() != KEY_SIZE {
            return Err(LocalError::KeySize);
        }
        let mut okm = Zeroizing::new([0u8; 2 * KEY_SIZE]);
        hkdf::Salt::new(hkdf::HKDF_SHA256, chaining_key)
            .extract(&[])
            .expand(&[], TwoKeys)
            .and_then(|o| o.fill(&mut okm[..]))
            .map_err(|_| LocalError::KeySize)?;
        let (to_responder, to_initiator) = okm.split_at(KEY_SIZE);
        let (send_key, recv_key) = if initiator {
            (to_responder, to_initiator)
        } else {
            (to_initiator, to_responder)
        };
        SessionCore::new(
            cipher,
            send_key,
            recv_key,
            local_index,
            remote_index,
            secure,
        )
    }

    /// `send_key` / `recv_key` are borrowed only to build the AEAD's keys: no copy of them is
    /// kept outside those key objects (wiped on drop, see above). Plain sessions ignore them.
    pub fn new(
        cipher: Cipher,
        send_key: &[u8],
        recv_key: &[u8],
        local_index: u32,
        remote_index: u32,
        secure: bool,
    ) -> Result<SessionCore, LocalError> {
        let keys = if secure {
            if send_key.len() != KEY_SIZE || recv_key.len() != KEY_SIZE {
                return Err(LocalError::KeySize);
            }
            let key = |k: &[u8]| {
                UnboundKey::new(cipher.algorithm(), k)
                    .map(LessSafeKey::new)
                    .map_err(|_| LocalError::KeySize)
            };
            Some((key(send_key)?, key(recv_key)?))
        } else {
            None
        };
        Ok(SessionCore {
            kind: if secure { DATA_SECURE } else { DATA_PLAIN },
            local_index,
            remote_index,
            keys,
            send: 0,
            window: ReplayWindow::new(),
            held: None,
            tx_bytes: 0,
            rx_bytes: 0,
            rx_packets: 0,
            refused: [0; 8],
        })
    }

    pub fn secure(&self) -> bool {
        self.keys.is_some()
    }

    pub fn send_counter(&self) -> u64 {
        self.send
    }

    pub fn recv_highest(&self) -> Option<u64> {
        self.window.highest()
    }

    /// Header, plus the tag on secure links.
    pub fn overhead(&self) -> usize {
        DATA_HEADER_SIZE + if self.secure() { TAG_SIZE } else { 0 }
    }

    /// Reserve `count` counters at once, all or nothing.
    pub fn reserve(&self, count: u64) -> Result<(), LocalError> {
        match self.send.checked_add(count) {
            Some(end) if end <= REJECT_AFTER_MESSAGES => Ok(()),
            _ => Err(LocalError::Exhausted),
        }
    }

    /// Append one datagram carrying the concatenation of `parts` to `out`, with the next
    /// counter; return its length.
    pub fn seal_parts(&mut self, out: &mut Vec<u8>, parts: &[&[u8]]) -> Result<usize, LocalError> {
        self.reserve(1)?;
        let counter = self.send;
        self.send += 1;
        let start = out.len();
        out.push(self.kind);
        out.extend_from_slice(&[0, 0, 0]);
        out.extend_from_slice(&self.remote_index.to_le_bytes());
        out.extend_from_slice(&counter.to_le_bytes());
        for p in parts {
            out.extend_from_slice(p);
        }
        let n = out.len() - start - DATA_HEADER_SIZE;
        if let Some((seal, _)) = &self.keys {
            let (header, body) = out[start..].split_at_mut(DATA_HEADER_SIZE);
            let tag = seal
                .seal_in_place_separate_tag(nonce(counter), Aad::from(&*header), body)
                .expect("the AEAD refuses only inputs longer than AES-GCM's limit");
            out.extend_from_slice(tag.as_ref());
        }
        self.tx_bytes += n as u64;
        Ok(out.len() - start)
    }

    /// Header checks only (no window, no cryptography).
    pub fn fit(&self, datagram: &[u8]) -> Fit {
        if datagram.len() < self.overhead() {
            return Fit::Short;
        }
        // The first word is type | pad << 8: one comparison checks the pad is zero too.
        if u32le(datagram, 0) != self.kind as u32 {
            return Fit::Type;
        }
        if u32le(datagram, 4) != self.local_index {
            return Fit::Index;
        }
        Fit::Ours(u64le(datagram, 8))
    }

    /// Plain sessions, before the window check: near the window, yes; far from it, only
    /// when it continues the far counter refused last (the window restarts for it);
    /// otherwise remember it and refuse: Jump when ahead, Replayed when older than the
    /// window. See PLAIN_MAX_JUMP.
    fn plain_admit(&mut self, counter: u64) -> Result<(), Refusal> {
        if counter >= REJECT_AFTER_MESSAGES {
            return Ok(()); // the window refuses it as Limit
        }
        let (near, ahead) = match self.window.highest() {
            None => (counter < PLAIN_MAX_JUMP, true),
            Some(h) if counter > h => (counter - h <= PLAIN_MAX_JUMP, true),
            Some(h) => (h - counter < WINDOW_SIZE, false),
        };
        if near {
            return Ok(());
        }
        if matches!(self.held, Some(held) if held < counter && counter - held <= PLAIN_MAX_JUMP) {
            self.held = None;
            self.window = ReplayWindow::new();
            return Ok(());
        }
        self.held = Some(counter);
        Err(if ahead {
            Refusal::Jump
        } else {
            Refusal::Replayed
        })
    }

    /// Open `datagram` in place (the caller's own copy): on success the payload is
    /// `datagram[16..16 + n]` and `n` is returned. Counts the refusal in `refused`.
    /// After a refusal the bytes of `datagram` are unspecified.
    pub fn open_in_place(&mut self, datagram: &mut [u8]) -> Result<usize, Refusal> {
        let result = self.open_inner(datagram);
        if let Err(r) = result {
            self.refused[r as usize] += 1;
        }
        result
    }

    fn open_inner(&mut self, datagram: &mut [u8]) -> Result<usize, Refusal> {
        let counter = match self.fit(datagram) {
            Fit::Short => return Err(Refusal::Short),
            Fit::Type => return Err(Refusal::Type),
            Fit::Index => return Err(Refusal::Index),
            Fit::Ours(c) => c,
        };
        self.open_checked(datagram, counter)
    }

    /// Open a datagram `fit` already accepted with `counter`: window check, tag, window
    /// update. Does not count the refusal (the caller does, by reason).
    pub fn open_checked(&mut self, datagram: &mut [u8], counter: u64) -> Result<usize, Refusal> {
        if !self.secure() {
            self.plain_admit(counter)?;
        }
        if !self.window.check(counter) {
            return Err(if counter >= REJECT_AFTER_MESSAGES {
                Refusal::Limit
            } else {
                Refusal::Replayed
            });
        }
        let (header, body) = datagram.split_at_mut(DATA_HEADER_SIZE);
        let n = match &self.keys {
            None => body.len(),
            Some((_, open)) => open
                .open_in_place(nonce(counter), Aad::from(&*header), body)
                .map_err(|_| Refusal::BadTag)?
                .len(),
        };
        // Authenticated (or a plain link): now, and only now, the window moves.
        self.window.update(counter);
        self.rx_packets += 1;
        self.rx_bytes += n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(cipher: Cipher, secure: bool) -> (SessionCore, SessionCore) {
        let (k1, k2) = ([1u8; 32], [2u8; 32]);
        let a = SessionCore::new(cipher, &k1, &k2, 10, 20, secure).unwrap();
        let b = SessionCore::new(cipher, &k2, &k1, 20, 10, secure).unwrap();
        (a, b)
    }

    fn seal(s: &mut SessionCore, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        s.seal_parts(&mut out, &[payload]).unwrap();
        out
    }

    /// Noise §4.3 HKDF(ck, "", 2), written out with HMAC as the spec states it.
    fn noise_split(ck: &[u8]) -> (Vec<u8>, Vec<u8>) {
        use aws_lc_rs::hmac;
        let temp = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, ck), b"");
        let key = hmac::Key::new(hmac::HMAC_SHA256, temp.as_ref());
        let out1 = hmac::sign(&key, &[1]);
        let out2 = hmac::sign(&key, &[out1.as_ref(), &[2]].concat());
        (out1.as_ref().to_vec(), out2.as_ref().to_vec())
    }

    #[test]
    fn chaining_key_split_is_noise_hkdf_and_the_two_ends_agree() {
        let ck = [9u8; 32];
        let (to_responder, to_initiator) = noise_split(&ck);
        for cipher in [Cipher::Aes256Gcm, Cipher::ChaCha20Poly1305] {
            let mut i = SessionCore::from_chaining_key(cipher, &ck, true, 1, 2, true).unwrap();
            let mut r = SessionCore::from_chaining_key(cipher, &ck, false, 2, 1, true).unwrap();
            let mut by_keys =
                SessionCore::new(cipher, &to_responder, &to_initiator, 1, 2, true).unwrap();
            let d = seal(&mut i, b"hello");
            assert_eq!(d, seal(&mut by_keys, b"hello"));
            let mut d2 = d.clone();
            assert_eq!(r.open_in_place(&mut d2).unwrap(), 5);
            let mut back = seal(&mut r, b"back");
            assert_eq!(i.open_in_place(&mut back).unwrap(), 4);
        }
        assert!(
            SessionCore::from_chaining_key(Cipher::Aes256Gcm, &ck[..31], true, 1, 2, true).is_err()
        );
    }

    #[test]
    fn round_trip_both_ciphers_and_plain() {
        for cipher in [Cipher::Aes256Gcm, Cipher::ChaCha20Poly1305] {
            for secure in [true, false] {
                let (mut a, mut b) = pair(cipher, secure);
                for (i, payload) in [&b""[..], b"x", &[7u8; 1500][..]].iter().enumerate() {
                    let mut d = seal(&mut a, payload);
                    assert_eq!(d.len(), payload.len() + a.overhead());
                    assert_eq!(u64le(&d, 8), i as u64);
                    let n = b.open_in_place(&mut d).unwrap();
                    assert_eq!(&d[16..16 + n], *payload);
                }
                assert_eq!(a.send_counter(), 3);
                assert_eq!(b.recv_highest(), Some(2));
                assert_eq!(b.rx_packets, 3);
            }
        }
    }

    #[test]
    fn refusals_in_order() {
        let (mut a, mut b) = pair(Cipher::Aes256Gcm, true);
        let d = seal(&mut a, b"hello");
        let mut short = d[..31].to_vec();
        assert_eq!(b.open_in_place(&mut short), Err(Refusal::Short));
        let mut pad = d.clone();
        pad[2] = 1;
        assert_eq!(b.open_in_place(&mut pad), Err(Refusal::Type));
        let mut plain = d.clone();
        plain[0] = DATA_PLAIN;
        assert_eq!(b.open_in_place(&mut plain), Err(Refusal::Type));
        let mut index = d.clone();
        index[4] ^= 1;
        assert_eq!(b.open_in_place(&mut index), Err(Refusal::Index));
        let mut forged = d.clone();
        forged[20] ^= 1;
        assert_eq!(b.open_in_place(&mut forged), Err(Refusal::BadTag));
        assert_eq!(b.recv_highest(), None, "a forgery never moves the window");
        assert!(b.open_in_place(&mut d.clone()).is_ok());
        assert_eq!(b.open_in_place(&mut d.clone()), Err(Refusal::Replayed));
        let mut limit = d.clone();
        limit[8..16].copy_from_slice(&REJECT_AFTER_MESSAGES.to_le_bytes());
        assert_eq!(b.open_in_place(&mut limit), Err(Refusal::Limit));
        assert_eq!(b.refused, [1, 2, 1, 1, 1, 0, 1, 0]);
    }

    #[test]
    fn forged_far_ahead_counter_does_not_slide_the_window() {
        let (mut a, mut b) = pair(Cipher::ChaCha20Poly1305, true);
        let first = seal(&mut a, b"one");
        let mut forged = first.clone();
        forged[8..16].copy_from_slice(&(1u64 << 40).to_le_bytes());
        assert_eq!(b.open_in_place(&mut forged), Err(Refusal::BadTag));
        assert!(b.open_in_place(&mut first.clone()).is_ok());
    }

    fn plain(counter: u64) -> Vec<u8> {
        let mut d = vec![DATA_PLAIN, 0, 0, 0];
        d.extend_from_slice(&20u32.to_le_bytes());
        d.extend_from_slice(&counter.to_le_bytes());
        d.extend_from_slice(b"forged");
        d
    }

    #[test]
    fn plain_far_jumps_need_a_second_datagram() {
        let (mut a, mut b) = pair(Cipher::Aes256Gcm, false);
        assert!(b.open_in_place(&mut seal(&mut a, b"0")).is_ok());
        let far = REJECT_AFTER_MESSAGES - 1;
        assert_eq!(b.open_in_place(&mut plain(far)), Err(Refusal::Jump));
        assert_eq!(
            b.recv_highest(),
            Some(0),
            "one forged counter moves nothing"
        );
        assert!(b.open_in_place(&mut seal(&mut a, b"1")).is_ok());
        assert!(b.open_in_place(&mut plain(PLAIN_MAX_JUMP + 1)).is_ok());
        // A sender back from an outage longer than the jump loses one datagram.
        a.send += 10 * PLAIN_MAX_JUMP;
        assert_eq!(b.open_in_place(&mut seal(&mut a, b"x")), Err(Refusal::Jump));
        assert!(b.open_in_place(&mut seal(&mut a, b"y")).is_ok());
        assert_eq!(b.recv_highest(), Some(a.send_counter() - 1));
        // Older than the window: refused as replayed, and a second one continuing it wins.
        assert_eq!(b.open_in_place(&mut plain(5)), Err(Refusal::Replayed));
        assert!(b.open_in_place(&mut plain(6)).is_ok());
        assert_eq!(b.recv_highest(), Some(6));
        assert_eq!(b.refused[Refusal::Jump as usize], 2);
    }

    #[test]
    fn ciphers_differ_and_tag_covers_header() {
        let (mut a, _) = pair(Cipher::Aes256Gcm, true);
        let (mut c, _) = pair(Cipher::ChaCha20Poly1305, true);
        assert_ne!(seal(&mut a, b"same"), seal(&mut c, b"same"));
    }

    #[test]
    fn send_counter_stops_at_the_reject_limit() {
        let (mut a, _) = pair(Cipher::Aes256Gcm, true);
        a.send = REJECT_AFTER_MESSAGES - 1;
        assert!(a.reserve(1).is_ok());
        assert_eq!(a.reserve(2), Err(LocalError::Exhausted));
        seal(&mut a, b"last");
        let mut out = Vec::new();
        assert_eq!(a.seal_parts(&mut out, &[b"x"]), Err(LocalError::Exhausted));
        assert!(out.is_empty());
    }

    #[test]
    fn bad_key_sizes() {
        assert!(SessionCore::new(Cipher::Aes256Gcm, &[0; 31], &[0; 32], 1, 2, true).is_err());
        assert!(SessionCore::new(Cipher::Aes256Gcm, &[], &[], 1, 2, false).is_ok());
    }
}
