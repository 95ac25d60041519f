//! Redis stream ids (`<ms>-<seq>`) as a small `Copy` value so order checks are integer compares.

use std::fmt;
use std::str::FromStr;

/// A Redis stream entry id. Ordered exactly as Redis orders them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct StreamId {
    pub ms: u64,
    pub seq: u64,
}

impl StreamId {
    pub const ZERO: StreamId = StreamId { ms: 0, seq: 0 };
    /// The greatest id there can be: nothing follows it.
    pub const MAX: StreamId = StreamId {
        ms: u64::MAX,
        seq: u64::MAX,
    };

    pub fn new(ms: u64, seq: u64) -> Self {
        Self { ms, seq }
    }

    /// The greatest id strictly below this one, so "deliver from X inclusive" can be expressed
    /// as "deliver everything after `X.prev()`".
    pub fn prev(self) -> StreamId {
        match (self.ms, self.seq) {
            (0, 0) => StreamId::ZERO,
            (ms, 0) => StreamId::new(ms - 1, u64::MAX),
            (ms, seq) => StreamId::new(ms, seq - 1),
        }
    }
}

impl fmt::Display for StreamId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.ms, self.seq)
    }
}

/// Parse failure for a stream id given by a client (`last_id`, `after`, `turn_id`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a stream id (expected <ms>-<seq> or <ms>)")]
pub struct BadStreamId;

impl FromStr for StreamId {
    type Err = BadStreamId;

    /// Accepts `ms-seq` and bare `ms` (seq 0), as Redis does for range bounds.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        fn num(part: &str) -> Result<u64, BadStreamId> {
            if part.is_empty() || part.len() > 20 || !part.bytes().all(|b| b.is_ascii_digit()) {
                return Err(BadStreamId);
            }
            part.parse().map_err(|_| BadStreamId)
        }
        match s.split_once('-') {
            Some((ms, seq)) => Ok(StreamId::new(num(ms)?, num(seq)?)),
            None => Ok(StreamId::new(num(s)?, 0)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_display_order() {
        let a: StreamId = "1700000000000-0".parse().unwrap();
        let b: StreamId = "1700000000000-1".parse().unwrap();
        let c: StreamId = "1700000000001".parse().unwrap();
        assert!(a < b && b < c);
        assert_eq!(a.to_string(), "1700000000000-0");
        assert_eq!(c, StreamId::new(1_700_000_000_001, 0));
        assert!("".parse::<StreamId>().is_err());
        assert!("1-".parse::<StreamId>().is_err());
        assert!("-1".parse::<StreamId>().is_err());
        assert!("1-2-3".parse::<StreamId>().is_err());
        assert!("+1".parse::<StreamId>().is_err());
        assert!("99999999999999999999999".parse::<StreamId>().is_err());
    }

    #[test]
    fn prev_is_the_predecessor() {
        assert_eq!(StreamId::new(5, 3).prev(), StreamId::new(5, 2));
        assert_eq!(StreamId::new(5, 0).prev(), StreamId::new(4, u64::MAX));
        assert_eq!(StreamId::ZERO.prev(), StreamId::ZERO);
        assert!(StreamId::new(5, 0).prev() < StreamId::new(5, 0));
    }
}
