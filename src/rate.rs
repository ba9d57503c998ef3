//! A fixed one-second rate window, the one counter behind every per-second limit: a
//! connection's messages (`messages_per_second_max`), its client events
//! (`client_events_per_second_max`) and an app's backend events
//! (`backend_events_per_second_max`, shared by all shards through `pack`/`unpack` on one
//! atomic word).
//!
//! Pure: the caller passes the clock second in. A new second starts an empty window, so a
//! burst may reach twice the limit across a second boundary; that is the documented cost of a
//! fixed window, and it needs no per-event memory.

/// Events counted in one clock second.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RateWindow {
    /// The second the window counts (whatever clock the caller uses).
    second: u64,
    /// Events counted in `second`.
    count: u32,
}

impl RateWindow {
    /// An empty window for `second`.
    pub fn starting(second: u64) -> RateWindow {
        RateWindow { second, count: 0 }
    }

    /// Counts `events` in second `now_s`, over a limit too (a client over its rate keeps being
    /// counted until the second ends); returns the window's count.
    pub fn record(&mut self, now_s: u64, events: u32) -> u32 {
        if self.second != now_s {
            *self = RateWindow::starting(now_s);
        }
        self.count = self.count.saturating_add(events);
        self.count
    }

    /// Counts `events` in second `now_s` only if the window then holds at most `max`; a
    /// refused batch is not counted, so a later smaller one may still fit.
    pub fn try_admit(&mut self, now_s: u64, events: u32, max: u32) -> bool {
        let used = if self.second == now_s { self.count } else { 0 };
        match used.checked_add(events).filter(|&total| total <= max) {
            Some(total) => {
                *self = RateWindow { second: now_s, count: total };
                true
            }
            None => false,
        }
    }

    /// One word for an atomic: the second's low 32 bits above the count.
    pub fn pack(self) -> u64 {
        ((self.second & 0xffff_ffff) << 32) | u64::from(self.count)
    }

    /// The window `pack` made; its second is the low 32 bits of the packed one, so compare it
    /// with `now_s & 0xffff_ffff`.
    pub fn unpack(word: u64) -> RateWindow {
        RateWindow { second: word >> 32, count: (word & 0xffff_ffff) as u32 }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `record` counts everything and restarts each second; `try_admit` counts only what fits;
    /// `pack`/`unpack` round-trip on the low 32 bits of the second.
    #[test]
    fn fixed_window() {
        let mut window = RateWindow::starting(7);
        assert_eq!(window.record(7, 2), 2);
        assert_eq!(window.record(7, 3), 5, "same second: counts add up");
        assert_eq!(window.record(8, 1), 1, "a new second starts empty");
        assert_eq!(window.record(8, u32::MAX), u32::MAX, "saturates, never wraps");

        let mut window = RateWindow::starting(1);
        assert!(window.try_admit(1, 3, 4));
        assert!(!window.try_admit(1, 2, 4), "3 + 2 > 4");
        assert!(window.try_admit(1, 1, 4), "the refused batch was not counted");
        assert!(!window.try_admit(1, 1, 4));
        assert!(window.try_admit(2, 4, 4), "next second");
        assert!(!window.try_admit(3, 5, 4), "a batch over the limit never fits");
        assert!(!window.try_admit(3, u32::MAX, u32::MAX - 1), "no overflow");

        let packed = RateWindow { second: (1 << 32) + 9, count: 17 }.pack();
        assert_eq!(RateWindow::unpack(packed), RateWindow { second: 9, count: 17 });
    }
}
