//! What a Pusher connection does with each message it receives: subscribe, unsubscribe,
//! ping, client events. Operates on shard state only; the socket side is `net::conn`.

use ring::hmac;

use super::router::ConnKey;
use super::{ConnState, Shard};
use crate::metrics::ShardMetrics;
use crate::pusher::channel::{self, ChannelKind};
use crate::pusher::message::{self, ClientMessage, SocketId, Subscribe};

/// Pusher error code for a client over its message rate.
pub const RATE_LIMITED: u16 = 4301;

impl Shard {
    /// Handles one text message from a client.
    pub async fn on_text(&self, key: ConnKey, text: &str) {
        let message = match message::parse_client_message(text) {
            Ok(message) => message,
            Err(e) => return self.send(key, message::error(None, &e.0, None)),
        };
        match message {
            ClientMessage::Ping => self.send(key, message::pong()),
            ClientMessage::Pong => {}
            ClientMessage::Subscribe(subscribe) => self.subscribe(key, &subscribe),
            ClientMessage::Unsubscribe { channel } => self.unsubscribe(key, &channel),
            ClientMessage::ClientEvent {
                event,
                channel,
                data,
            } => {
                let data = data.map(|d| d.to_owned()).unwrap_or_else(|| {
                    serde_json::value::RawValue::from_string("null".into())
                        .expect("null is valid JSON")
                });
                self.client_event(key, &event, &channel, &data).await
            }
            ClientMessage::Unknown { event } => self.send(
                key,
                message::error(None, &format!("unsupported event: {event}"), None),
            ),
        }
    }

    fn subscribe(&self, key: ConnKey, subscribe: &Subscribe<'_>) {
        let name = subscribe.channel.as_ref();
        if let Err(e) = channel::validate(name) {
            return self.send(
                key,
                message::error(None, &format!("invalid channel name: {e}"), Some(name)),
            );
        }
        let (app_index, socket_id, already, count) = {
            let state = self.state.borrow();
            let conn = &state.connections[key];
            (
                conn.app,
                conn.socket_id,
                conn.channels.iter().any(|c| c.as_ref() == name),
                conn.channels.len(),
            )
        };
        let app = self.apps.get(app_index);
        match ChannelKind::of(name) {
            ChannelKind::Public => {}
            ChannelKind::Private | ChannelKind::PrivateEncrypted => {
                if let Err(reason) = check_channel_auth(
                    &app.config.key,
                    &app.secret_key,
                    socket_id,
                    name,
                    subscribe.auth.as_deref(),
                ) {
                    return self.send(key, message::error(None, &reason, Some(name)));
                }
            }
            ChannelKind::Presence => {
                return self.send(
                    key,
                    message::error(None, "presence channels are not supported yet", Some(name)),
                );
            }
        }
        if already {
            // Idempotent, as pusher-js may resubscribe after a reconnect race.
            return self.send(key, message::subscription_succeeded(name));
        }
        if count >= self.config.websocket.channels_per_connection_max {
            let reason = format!(
                "subscription limit reached: at most {} channels per connection",
                self.config.websocket.channels_per_connection_max
            );
            return self.send(key, message::error(None, &reason, Some(name)));
        }
        {
            let mut state = self.state.borrow_mut();
            state.router.subscribe(app_index, name, key);
            state.connections[key].channels.push(name.into());
        }
        ShardMetrics::add(&self.metrics().subscriptions, 1);
        self.send(key, message::subscription_succeeded(name));
    }

    fn unsubscribe(&self, key: ConnKey, name: &str) {
        let mut state = self.state.borrow_mut();
        let conn = &mut state.connections[key];
        let Some(position) = conn.channels.iter().position(|c| c.as_ref() == name) else {
            return;
        };
        conn.channels.swap_remove(position);
        let app = conn.app;
        state.router.unsubscribe(app, name, key);
        ShardMetrics::sub(&self.metrics().subscriptions, 1);
    }

    /// Relays a `client-*` event to the channel's other subscribers on every shard.
    async fn client_event(
        &self,
        key: ConnKey,
        event: &str,
        name: &str,
        data: &serde_json::value::RawValue,
    ) {
        let (app_index, socket_id, subscribed, open) = {
            let state = self.state.borrow();
            let conn = &state.connections[key];
            (
                conn.app,
                conn.socket_id,
                conn.channels.iter().any(|c| c.as_ref() == name),
                conn.state == ConnState::Open,
            )
        };
        let app = self.apps.get(app_index);
        let refusal = if !app.config.enable_client_events {
            Some("client events are disabled for this app")
        } else if ChannelKind::of(name) != ChannelKind::Private {
            Some("client events are only allowed on private and presence channels, not public or encrypted ones")
        } else if !subscribed {
            Some("client event on a channel this connection is not subscribed to")
        } else {
            None
        };
        if let Some(reason) = refusal {
            return self.send(key, message::error(None, reason, Some(name)));
        }
        if open {
            let frame = message::channel_event(event, name, data);
            self.publish(app_index, name, frame, Some(socket_id)).await;
        }
    }
}

/// Checks `auth` = `key:hex(HMAC-SHA256(secret, "socket_id:channel"))`, constant-time on the
/// signature, and the key part must be the app's own (reference §1.8).
pub fn check_channel_auth(
    app_key: &str,
    secret: &hmac::Key,
    socket_id: SocketId,
    channel: &str,
    auth: Option<&str>,
) -> Result<(), String> {
    let auth = auth.unwrap_or("");
    let to_sign = format!("{socket_id}:{channel}");
    let expected = || {
        format!("Invalid signature: Expected HMAC SHA256 hex digest of {to_sign}, but got {auth}")
    };
    let Some((key, signature)) = auth.split_once(':') else {
        return Err(expected());
    };
    let Ok(signature) = hex::decode(signature) else {
        return Err(expected());
    };
    if key != app_key {
        return Err(format!("Invalid key in auth: {key}"));
    }
    hmac::verify(secret, to_sign.as_bytes(), &signature).map_err(|_| expected())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pusher's documented private-channel vector verifies; tampering does not.
    #[test]
    fn private_channel_vector() {
        let secret = hmac::Key::new(hmac::HMAC_SHA256, b"7ad3773142a6692b25b8");
        let socket_id = SocketId {
            sequence: 1234,
            random: 1234,
        };
        let good =
            "278d425bdf160c739803:58df8b0c36d6982b82c3ecf6b4662e34fe8c25bba48f5369f135bf843651c3a4";
        assert_eq!(
            check_channel_auth(
                "278d425bdf160c739803",
                &secret,
                socket_id,
                "private-foobar",
                Some(good)
            ),
            Ok(())
        );
        let bad_sig = good.replace(":58", ":59");
        assert!(check_channel_auth(
            "278d425bdf160c739803",
            &secret,
            socket_id,
            "private-foobar",
            Some(&bad_sig)
        )
        .is_err());
        let bad_key = good.replace("278d", "278e");
        assert!(check_channel_auth(
            "278d425bdf160c739803",
            &secret,
            socket_id,
            "private-foobar",
            Some(&bad_key)
        )
        .is_err());
        assert!(check_channel_auth(
            "278d425bdf160c739803",
            &secret,
            socket_id,
            "private-other",
            Some(good)
        )
        .is_err());
        assert!(check_channel_auth(
            "278d425bdf160c739803",
            &secret,
            socket_id,
            "private-foobar",
            None
        )
        .is_err());
    }
}
