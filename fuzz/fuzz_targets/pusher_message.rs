//! Pusher client messages: never panic on any text; a subscribe's channel is always checked
//! by the channel-name validator without panicking.
#![no_main]
use libfuzzer_sys::fuzz_target;
use ringwire::pusher::{channel, message};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(message::ClientMessage::Subscribe(subscribe)) = message::parse_client_message(text) {
        let _ = channel::validate(&subscribe.channel);
        let _ = channel::ChannelKind::of(&subscribe.channel);
    }
    let _ = message::SocketId::parse(text).map(|id| assert_eq!(message::SocketId::parse(&id.to_string()), Some(id)));
});
