//! Why a delivery is refused, and the webhook ids receivers see.
//!
//! Owns `Refused` and the webhook id format. The live deliveries themselves, their dead flags
//! and byte budgets are in one place, the WAL's index (`wal::index::LiveIndex`), which the
//! dispatcher reads; this module never touches the WAL, the queues or sockets.

use crate::wal::{SequenceNumber, WalError};

/// Why a delivery could not be created.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// The shard's queue is at `queue_bytes_max`.
    #[error("the webhook queue is full (webhooks.queue_bytes_max); retry later")]
    QueueFull,
    /// One endpoint's queue is at `endpoint_queue_bytes_max`: its receiver is slow or failing.
    #[error(
        "the webhook queue of endpoint {0} is full (webhooks.endpoint_queue_bytes_max): its receiver is slow or \
         failing; retry later"
    )]
    EndpointFull(String),
    /// The WAL failed.
    #[error("{0}")]
    Wal(#[from] WalError),
}

/// The webhook id a receiver sees for delivery `seq` of the log `log_id` (stable across
/// attempts and restarts): `msg_` and 32 lowercase hex digits.
pub fn webhook_id(log_id: u64, seq: SequenceNumber) -> String {
    format!("msg_{log_id:016x}{:016x}", seq.get())
}

/// The sequence number in one of log `log_id`'s webhook ids; `None` for anything else. The
/// id comes from a request path: it is checked to be ASCII hex before it is sliced.
pub fn parse_webhook_id(log_id: u64, id: &str) -> Option<SequenceNumber> {
    let hex = id.strip_prefix("msg_")?;
    if hex.len() != 32 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let (log, seq) = hex.split_at(16);
    if u64::from_str_radix(log, 16).ok()? != log_id {
        return None;
    }
    u64::from_str_radix(seq, 16).ok().map(SequenceNumber::new)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Webhook ids round-trip; another log's ids, non-hex and wrong lengths are refused.
    #[test]
    fn webhook_ids_round_trip_and_refuse_strangers() {
        let id = webhook_id(0xabc, SequenceNumber::new(42));
        assert_eq!(id, "msg_0000000000000abc000000000000002a");
        assert_eq!(parse_webhook_id(0xabc, &id), Some(SequenceNumber::new(42)));
        assert_eq!(parse_webhook_id(0xabd, &id), None);
        for bad in
            ["", "msg_", "msg_zz00000000000abc000000000000002a", "msg_0abc", "msg_é000000000000abc00000000000002a"]
        {
            assert_eq!(parse_webhook_id(0xabc, bad), None, "{bad:?}");
        }
    }
}
