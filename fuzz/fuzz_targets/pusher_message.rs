//! Pusher client messages: never panic on any text. A subscribe's channel always goes
//! through the name validator; presence `channel_data` and sign-in `user_data` parse without
//! panicking, and what they accept respects their limits; socket ids round-trip.
#![no_main]
use libfuzzer_sys::fuzz_target;
use ringwire::pusher::{channel, message};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    match message::parse_client_message(text) {
        Ok(message::ClientMessage::Subscribe(subscribe)) => {
            let _ = channel::validate(&subscribe.channel);
            let _ = channel::ChannelKind::of(&subscribe.channel);
            if let Some(channel_data) = subscribe.channel_data.as_deref() {
                if let Ok((user_id, user_info)) = message::parse_member(channel_data, 64) {
                    assert!(!user_id.is_empty() && user_id.len() <= message::USER_ID_BYTES_MAX);
                    assert!(user_info.len() <= 64);
                    let _: serde_json::Value = serde_json::from_str(&user_info).expect("user_info is JSON");
                }
            }
        }
        Ok(message::ClientMessage::Signin(signin)) => {
            if let Ok((user_id, watchlist)) = message::parse_user(&signin.user_data) {
                let own = format!("{}{user_id}", channel::SERVER_TO_USER_PREFIX);
                assert_eq!(channel::validate(&own), Ok(()));
                assert!(watchlist.len() <= message::WATCHLIST_MAX);
            }
        }
        _ => {}
    }
    let _ = message::parse_member(text, 1024);
    let _ = message::parse_user(text);
    let _ = message::SocketId::parse(text).map(|id| assert_eq!(message::SocketId::parse(&id.to_string()), Some(id)));
});
