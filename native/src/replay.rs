//! RFC 6479 replay window over 64-bit counters, the same window as proto/session.py's
//! `ReplayWindow` (wireguard-go's replay/replay.go): a ring of RING_BLOCKS 64-bit blocks,
//! one kept spare, so WINDOW_SIZE = (RING_BLOCKS - 1) * 64 = 8128.
//!
//! A counter is accepted once if it is below REJECT_AFTER_MESSAGES and
//! `counter > highest - WINDOW_SIZE`. Counter 0 is a valid first counter.

use crate::wire::REJECT_AFTER_MESSAGES;

const BLOCK_BITS_LOG: u32 = 6;
const BLOCK_BIT_MASK: u64 = (1 << BLOCK_BITS_LOG) - 1;
pub const RING_BLOCKS: usize = 128;
const RING_MASK: u64 = RING_BLOCKS as u64 - 1;
pub const WINDOW_SIZE: u64 = (RING_BLOCKS as u64 - 1) << BLOCK_BITS_LOG;

#[derive(Clone)]
pub struct ReplayWindow {
    /// Highest counter accepted; None before the first.
    last: Option<u64>,
    ring: [u64; RING_BLOCKS],
}

impl Default for ReplayWindow {
    fn default() -> Self {
        Self::new()
    }
}

impl ReplayWindow {
    pub fn new() -> Self {
        ReplayWindow {
            last: None,
            ring: [0; RING_BLOCKS],
        }
    }

    /// Largest counter accepted so far (None before the first).
    pub fn highest(&self) -> Option<u64> {
        self.last
    }

    /// Would `counter` be accepted? Does not change the window.
    pub fn check(&self, counter: u64) -> bool {
        if counter >= REJECT_AFTER_MESSAGES {
            return false;
        }
        let last = match self.last {
            None => return true,
            Some(last) => last,
        };
        if counter > last {
            return true;
        }
        if last - counter >= WINDOW_SIZE {
            return false;
        }
        let block = self.ring[((counter >> BLOCK_BITS_LOG) & RING_MASK) as usize];
        (block >> (counter & BLOCK_BIT_MASK)) & 1 == 0
    }

    /// Accept `counter` (true) or refuse it as a replay, too old or past the limit (false).
    pub fn update(&mut self, counter: u64) -> bool {
        if counter >= REJECT_AFTER_MESSAGES {
            return false;
        }
        match self.last {
            Some(last) if counter <= last => {
                if last - counter >= WINDOW_SIZE {
                    return false;
                }
            }
            _ => self.advance(counter),
        }
        let i = ((counter >> BLOCK_BITS_LOG) & RING_MASK) as usize;
        let bit = 1u64 << (counter & BLOCK_BIT_MASK);
        if self.ring[i] & bit != 0 {
            return false;
        }
        self.ring[i] |= bit;
        true
    }

    /// Make `counter` (above `highest`) the highest, zeroing the blocks the window enters
    /// (all of them on a far jump).
    fn advance(&mut self, counter: u64) {
        let block = counter >> BLOCK_BITS_LOG;
        // Before the first counter the current block is "-1": blocks 0..=block are entered.
        let first = match self.last {
            None => 0,
            Some(last) => (last >> BLOCK_BITS_LOG) + 1,
        };
        if block + 1 - first >= RING_BLOCKS as u64 {
            self.ring = [0; RING_BLOCKS];
        } else {
            for b in first..=block {
                self.ring[(b & RING_MASK) as usize] = 0;
            }
        }
        self.last = Some(counter);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    const W: u64 = WINDOW_SIZE;
    const LIMIT: u64 = REJECT_AFTER_MESSAGES;

    fn accept_all(w: &mut ReplayWindow, counters: impl IntoIterator<Item = u64>) {
        for c in counters {
            assert!(w.update(c), "{c}");
        }
    }

    #[test]
    fn window_size_is_wireguards() {
        assert_eq!(W, 8192 - 64);
    }

    #[test]
    fn zero_first_then_duplicate() {
        let mut w = ReplayWindow::new();
        assert_eq!(w.highest(), None);
        assert!(w.check(0));
        assert!(w.update(0));
        assert_eq!(w.highest(), Some(0));
        assert!(!w.check(0));
        assert!(!w.update(0));
    }

    #[test]
    fn zero_after_higher_counters() {
        let mut w = ReplayWindow::new();
        accept_all(&mut w, [5, 3]);
        assert!(w.update(0));
        assert!(!w.update(0));
        assert!(!w.update(5));
    }

    #[test]
    fn out_of_order_within_window() {
        let mut w = ReplayWindow::new();
        let order = [7, 1, 0, 3, 2, 6, 5, 4, 100, 64, 63, 65, 99];
        accept_all(&mut w, order);
        for c in order {
            assert!(!w.check(c));
            assert!(!w.update(c));
        }
        assert!(w.update(8));
    }

    #[test]
    fn too_old_just_outside_vs_just_inside() {
        for high in [W, W + 1, W + 63, W + 64, 5 * W + 17, 1 << 40] {
            let mut w = ReplayWindow::new();
            assert!(w.update(high));
            assert!(!w.check(high - W), "{high}");
            assert!(!w.update(high - W), "{high}");
            assert!(w.check(high - W + 1), "{high}");
            assert!(w.update(high - W + 1), "{high}");
            assert!(!w.update(high - W + 1), "{high}");
        }
    }

    #[test]
    fn slide_clears_reused_blocks() {
        let mut w = ReplayWindow::new();
        accept_all(&mut w, 0..W);
        let top = RING_BLOCKS as u64 * 64 + 70;
        assert!(w.update(top));
        accept_all(&mut w, W..top);
        for c in [
            top - W + 1,
            top - W + 2,
            W - 1,
            top,
            0,
            63,
            64,
            127,
            top - W,
        ] {
            assert!(!w.update(c), "{c}");
        }
    }

    #[test]
    fn jump_exactly_one_ring_ahead() {
        let mut w = ReplayWindow::new();
        accept_all(&mut w, 0..64);
        let r = RING_BLOCKS as u64 * 64;
        assert!(w.update(r));
        assert!(w.update(r + 1));
        assert!(!w.update(r));
        assert!(!w.update(63));
    }

    #[test]
    fn first_counter_far_ahead() {
        let mut w = ReplayWindow::new();
        assert!(w.update(10u64.pow(12)));
        assert!(w.update(10u64.pow(12) - 1));
        assert!(!w.update(0));
    }

    #[test]
    fn near_the_reject_limit() {
        let mut w = ReplayWindow::new();
        for c in [LIMIT, LIMIT + 1, u64::MAX] {
            assert!(!w.check(c));
            assert!(!w.update(c));
        }
        assert_eq!(w.highest(), None);
        assert!(w.update(LIMIT - 1));
        assert!(!w.update(LIMIT - 1));
        assert!(!w.update(LIMIT));
        assert!(w.update(LIMIT - 2));
        assert!(w.update(LIMIT - W));
        assert!(!w.update(LIMIT - 1 - W));
        assert_eq!(w.highest(), Some(LIMIT - 1));
    }

    /// The specification as a set: accept iff below the limit, unseen and > highest - W.
    #[test]
    fn matches_set_model() {
        let mut seed = 0x9E37_79B9_7F4A_7C15u64;
        let mut rnd = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for base in [0u64, 63, 64, W, (1 << 32) - 1, LIMIT - 2 * W, LIMIT - 5] {
            let mut w = ReplayWindow::new();
            let mut seen = std::collections::HashSet::new();
            let mut highest: Option<u64> = None;
            for _ in 0..20_000 {
                let step: i128 = match rnd() % 6 {
                    0 => (rnd() % 161) as i128 - 80,
                    1 => (rnd() % 261) as i128 - W as i128 - 130,
                    2 => (rnd() % 401) as i128 + W as i128 - 200,
                    3 => ((rnd() % RING_BLOCKS as u64 + 1) * 64) as i128,
                    4 => {
                        [-(W as i128), 1 - W as i128, -1 - W as i128, 0, 1, -1][rnd() as usize % 6]
                    }
                    _ => (rnd() % (6 * W)) as i128 - 3 * W as i128,
                };
                let c = highest.unwrap_or(0).max(base) as i128 + step;
                if c < 0 || c > u64::MAX as i128 {
                    continue;
                }
                let c = c as u64;
                let expected = c < LIMIT
                    && !seen.contains(&c)
                    && highest.is_none_or(|h| c as i128 > h as i128 - W as i128);
                assert_eq!(w.check(c), expected, "{c}");
                assert_eq!(w.update(c), expected, "{c}");
                if expected {
                    seen.insert(c);
                    highest = Some(highest.map_or(c, |h| h.max(c)));
                }
                assert_eq!(w.highest(), highest);
            }
        }
    }
}
