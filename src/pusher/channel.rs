//! Channel names and kinds (Pusher protocol v7, reference §1.7).
//!
//! Owns the name rules and the anchored prefix checks. Knows nothing of subscribers.

/// Longest channel name accepted. Pusher's support page says 164, every server SDK validates
/// 200 (pusher-http-node, pusher-http-python); ringwire accepts what the SDKs send.
pub const CHANNEL_NAME_BYTES_MAX: usize = 200;

/// What kind of channel a name denotes. Prefixes are anchored: `my-private-x` is public.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChannelKind {
    /// No prefix.
    Public,
    /// `private-`
    Private,
    /// `private-encrypted-`
    PrivateEncrypted,
    /// `presence-`
    Presence,
    /// `#server-to-user-{user_id}`: events for one signed-in user (reference §1.7).
    ServerToUser,
}

/// Prefix of a signed-in user's own channel.
pub const SERVER_TO_USER_PREFIX: &str = "#server-to-user-";

impl ChannelKind {
    /// The kind of a (valid) channel name. Cache variants (`private-cache-`, ...) keep the kind
    /// of their base prefix, which the anchored checks give for free.
    pub fn of(name: &str) -> ChannelKind {
        if name.starts_with(SERVER_TO_USER_PREFIX) {
            ChannelKind::ServerToUser
        } else if name.starts_with("private-encrypted-") {
            ChannelKind::PrivateEncrypted
        } else if name.starts_with("private-") {
            ChannelKind::Private
        } else if name.starts_with("presence-") {
            ChannelKind::Presence
        } else {
            ChannelKind::Public
        }
    }
}

/// Whether a channel is a cache channel: `cache-`, `private-cache-`,
/// `private-encrypted-cache-` or `presence-cache-` (anchored, reference §1.7).
pub fn is_cache(name: &str) -> bool {
    ["cache-", "private-cache-", "private-encrypted-cache-", "presence-cache-"].iter().any(|p| name.starts_with(p))
}

/// Why a channel name is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChannelNameError {
    /// Empty name.
    Empty,
    /// Longer than `CHANNEL_NAME_BYTES_MAX`.
    TooLong,
    /// A character outside `A-Z a-z 0-9 _ - = @ , . ;`.
    InvalidCharacter,
}

impl std::fmt::Display for ChannelNameError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ChannelNameError::Empty => write!(f, "channel name is empty"),
            ChannelNameError::TooLong => write!(f, "channel name longer than {CHANNEL_NAME_BYTES_MAX} characters"),
            ChannelNameError::InvalidCharacter => {
                write!(f, "channel name may only contain A-Z, a-z, 0-9 and _ - = @ , . ;")
            }
        }
    }
}

/// Validates a channel name a client subscribes to or a server publishes on.
pub fn validate(name: &str) -> Result<(), ChannelNameError> {
    if name.is_empty() {
        return Err(ChannelNameError::Empty);
    }
    if name.len() > CHANNEL_NAME_BYTES_MAX {
        return Err(ChannelNameError::TooLong);
    }
    // `#server-to-user-` is the one name with a `#`; the user id after it follows the rules.
    let name = match name.strip_prefix(SERVER_TO_USER_PREFIX) {
        Some("") => return Err(ChannelNameError::Empty),
        Some(user_id) => user_id,
        None => name,
    };
    if !name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'=' | b'@' | b',' | b'.' | b';')) {
        return Err(ChannelNameError::InvalidCharacter);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Names and the anchored prefix rule.
    #[test]
    fn kinds_are_anchored() {
        assert_eq!(ChannelKind::of("private-a"), ChannelKind::Private);
        assert_eq!(ChannelKind::of("private-encrypted-a"), ChannelKind::PrivateEncrypted);
        assert_eq!(ChannelKind::of("presence-a"), ChannelKind::Presence);
        assert_eq!(ChannelKind::of("my-private-a"), ChannelKind::Public);
        assert_eq!(ChannelKind::of("privatea"), ChannelKind::Public);
        assert_eq!(ChannelKind::of("cache-a"), ChannelKind::Public);
        assert_eq!(ChannelKind::of("presence-cache-a"), ChannelKind::Presence);
        assert!(is_cache("cache-a") && is_cache("private-cache-a") && is_cache("presence-cache-a"));
        assert!(is_cache("private-encrypted-cache-a"));
        assert!(!is_cache("my-cache-a") && !is_cache("private-a") && !is_cache("cachea"));
    }

    /// The allowed alphabet and length.
    #[test]
    fn validation() {
        assert_eq!(validate("azAZ09_-=@,.;"), Ok(()));
        assert_eq!(validate(""), Err(ChannelNameError::Empty));
        assert_eq!(validate(&"a".repeat(200)), Ok(()));
        assert_eq!(validate(&"a".repeat(201)), Err(ChannelNameError::TooLong));
        assert_eq!(validate("a b"), Err(ChannelNameError::InvalidCharacter));
        assert_eq!(validate("#server-to-user-1"), Ok(()));
        assert_eq!(ChannelKind::of("#server-to-user-1"), ChannelKind::ServerToUser);
        assert_eq!(validate("#server-to-user-"), Err(ChannelNameError::Empty));
        assert_eq!(validate("#other"), Err(ChannelNameError::InvalidCharacter));
        assert_eq!(validate("é"), Err(ChannelNameError::InvalidCharacter));
    }
}
