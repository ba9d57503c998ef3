//! What a Pusher connection does with each message it receives: subscribe, unsubscribe,
//! ping, client events, sign-in; and the server's side of users (`terminate_user`).
//! Operates on shard state only; the socket side is `net::conn`.

use std::convert::Infallible;

use ring::hmac;
use serde_json::value::RawValue;

use super::accept::Acknowledged;
use super::mesh::{HomeJoin, MeshMessage, Watcher};
use crate::apps::AppIndex;
use crate::webhook::event::LifecycleEvent;

use super::router::ConnKey;
use super::{ConnState, Shard};
use crate::metrics::ShardMetrics;
use crate::pusher::channel::{self, ChannelKind};
use crate::pusher::message::{self, parse_member, parse_user, ClientMessage, Signin, Subscribe};

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
            ClientMessage::ClientEvent { event, channel, data } => {
                let data = data.map(|d| d.to_owned()).unwrap_or_else(|| {
                    serde_json::value::RawValue::from_string("null".into()).expect("null is valid JSON")
                });
                self.client_event(key, &event, &channel, &data).await
            }
            ClientMessage::Signin(signin) => self.signin(key, &signin),
            ClientMessage::Unknown { event } => {
                self.send(key, message::error(None, &format!("unsupported event: {event}"), None))
            }
        }
    }

    pub(super) fn subscribe(&self, key: ConnKey, subscribe: &Subscribe<'_>) {
        let name = subscribe.channel.as_ref();
        if let Err(e) = channel::validate(name) {
            let reason = format!("invalid channel name: {e}");
            return self.send(key, message::error(None, &reason, Some(name)));
        }
        // Cluster mode, link down: the channel's last event may be in Redis only, so the client
        // is sent to reconnect (to a healthy node) rather than given a cache_miss that may be
        // wrong (docs/cluster.md, "When Redis is unreachable").
        if channel::is_cache(name) && self.cluster_down() {
            let code = super::cluster_link::MISSED_MESSAGES;
            return self.close(key, code, "cluster unavailable, reconnect");
        }
        let (app_index, socket_id, already, count) = {
            let state = self.state.borrow();
            let conn = &state.connections[key];
            let already = conn.channels.iter().any(|c| c.as_ref() == name);
            (conn.app, conn.socket_id, already, conn.channels.len())
        };
        let apps = self.apps();
        let app = apps.get(app_index);
        let auth = subscribe.auth.as_deref();
        let member = match ChannelKind::of(name) {
            ChannelKind::Public => None,
            ChannelKind::ServerToUser => {
                let own = self.state.borrow().connections[key]
                    .user_id
                    .as_deref()
                    .is_some_and(|id| name.strip_prefix(channel::SERVER_TO_USER_PREFIX) == Some(id));
                if !own {
                    let reason = "#server-to-user- channels are only for the signed-in user's own id";
                    return self.send(key, message::error(None, reason, Some(name)));
                }
                None
            }
            ChannelKind::Private | ChannelKind::PrivateEncrypted => {
                let to_sign = format!("{socket_id}:{name}");
                if let Err(reason) = check_auth(&app.config.key, &app.secret_key, &to_sign, auth) {
                    return self.send(key, message::error(None, &reason, Some(name)));
                }
                None
            }
            ChannelKind::Presence => {
                // The signature covers channel_data exactly as received (Pusher's auth
                // signatures: https://pusher.com/docs/channels/library_auth_reference/auth-signatures/).
                let channel_data = subscribe.channel_data.as_deref().unwrap_or("");
                let to_sign = format!("{socket_id}:{name}:{channel_data}");
                let member = check_auth(&app.config.key, &app.secret_key, &to_sign, auth)
                    .and_then(|()| parse_member(channel_data, app.config.presence_user_info_bytes_max));
                match member {
                    Ok(member) => Some(member),
                    Err(reason) => return self.send(key, message::error(None, &reason, Some(name))),
                }
            }
        };
        // docs/cluster.md, "When Redis is unreachable": only Redis can decide a member, so the
        // client is sent to reconnect, preferably to a node whose link is up.
        if member.is_some() && self.cluster_down() {
            let reason = super::cluster_home::PRESENCE_UNAVAILABLE;
            return self.refuse(key, super::cluster_link::MISSED_MESSAGES, reason);
        }
        if already {
            if member.is_some() {
                let reason = "already subscribed to this presence channel";
                return self.send(key, message::error(None, reason, Some(name)));
            }
            // Idempotent, as pusher-js may resubscribe after a reconnect race.
            return self.send(key, message::subscription_succeeded(name));
        }
        let limit = app.config.channels_per_connection_max;
        if count >= limit {
            let reason = format!("subscription limit reached: at most {limit} channels per connection");
            return self.send(key, message::error(None, &reason, Some(name)));
        }
        ShardMetrics::add(&self.metrics().subscriptions, 1);
        let mut state = self.state.borrow_mut();
        let conn = &mut state.connections[key];
        conn.channels.push(name.into());
        // "Authorized connections": a private or presence channel counts once its signature
        // verified (a presence join refused later for a full channel still had a valid one).
        conn.authorized |= matches!(
            ChannelKind::of(name),
            ChannelKind::Private | ChannelKind::PrivateEncrypted | ChannelKind::Presence
        );
        let cache = channel::is_cache(name);
        if member.is_none() && !cache {
            state.router.subscribe(app_index, name, key);
            drop(state);
            self.send(key, message::subscription_succeeded(name));
            return self.subscription_changed(app_index, name, 1);
        }
        // Presence and cache channels go to the channel's home shard first, which answers with
        // the member list and the cached event; the connection joins the router then.
        let ticket = state.joins.issue();
        let conn = &mut state.connections[key];
        conn.joins.push((name.into(), ticket));
        if let Some((user_id, _)) = &member {
            conn.presence.push((name.into(), user_id.clone()));
        }
        drop(state);
        let channel = name.into();
        let join = HomeJoin { from: self.index, conn: key, socket_id, ticket, app: app_index, channel, member, cache };
        self.home_join(join);
    }

    pub(super) fn unsubscribe(&self, key: ConnKey, name: &str) {
        let mut state = self.state.borrow_mut();
        let conn = &mut state.connections[key];
        let Some(position) = conn.channels.iter().position(|c| c.as_ref() == name) else {
            return;
        };
        conn.channels.swap_remove(position);
        // A join still waiting for its home shard is forgotten: its reply will be stale.
        let pending = conn.joins.iter().position(|(c, _)| c.as_ref() == name).map(|i| conn.joins.swap_remove(i).1);
        let app = conn.app;
        let presence = conn.presence.iter().position(|(c, _)| c.as_ref() == name);
        let left = presence.map(|i| conn.presence.swap_remove(i));
        let was_routed = state.router.unsubscribe(app, name, key);
        drop(state);
        ShardMetrics::sub(&self.metrics().subscriptions, 1);
        // The member leaves before the channel empties (as at teardown), so the home shard
        // knows of its pending removal when the count reaches 0 (member_removed, then
        // channel_vacated).
        if let Some((channel, user_id)) = left {
            self.presence_leave_after(pending, app, channel, user_id);
        }
        if was_routed {
            self.subscription_changed(app, name, -1);
        }
    }

    /// Relays a `client-*` event to the channel's other subscribers on every shard.
    async fn client_event(&self, key: ConnKey, event: &str, name: &str, data: &RawValue) {
        let (app_index, socket_id, subscribed, open, user_id) = {
            let state = self.state.borrow();
            let conn = &state.connections[key];
            let subscribed = conn.channels.iter().any(|c| c.as_ref() == name);
            let user_id = conn.presence.iter().find(|(c, _)| c.as_ref() == name).map(|(_, u)| u.clone());
            (conn.app, conn.socket_id, subscribed, conn.state == ConnState::Open, user_id)
        };
        let apps = self.apps();
        let app = apps.get(app_index);
        let kind = ChannelKind::of(name);
        let max = app.config.client_events_per_second_max;
        if max > 0 && !self.count_client_event(key, max) {
            ShardMetrics::add(&self.metrics().rate_limited_total, 1);
            let error = message::error(Some(RATE_LIMITED), "Client event rejected due to rate limit", Some(name));
            return self.send(key, error);
        }
        let refusal = if !app.config.enable_client_events {
            Some("client events are disabled for this app")
        } else if !matches!(kind, ChannelKind::Private | ChannelKind::Presence) {
            Some("client events are only allowed on private and presence channels, not public or encrypted ones")
        } else if !subscribed {
            Some("client event on a channel this connection is not subscribed to")
        } else {
            None
        };
        if let Some(reason) = refusal {
            return self.send(key, message::error(None, reason, Some(name)));
        }
        // Refused before its webhook is created, as an event that cannot be relayed is not
        // accepted.
        if self.cluster_down() {
            return self.send(key, super::cluster_link::relay_refused(name));
        }
        if open {
            // On presence channels the relayed event names its sender (Pusher's client events
            // docs: "user_id" is added on presence channels).
            let frame = message::channel_event_from(event, name, data, user_id.as_deref());
            let create = || {
                let durable_at = self.lifecycle(app_index, || {
                    let raw = data.get();
                    let data: std::borrow::Cow<str> =
                        serde_json::from_str(raw).unwrap_or(std::borrow::Cow::Borrowed(raw));
                    LifecycleEvent::client_event(name, event, &data, &socket_id.to_string(), user_id.as_deref())
                });
                Ok::<_, Infallible>(durable_at)
            };
            // The design's contract: a client event is accepted when relayed, so its webhook is
            // durable first (group commit; only for apps whose webhooks select client_event).
            let publish = self.relay(key, app_index, name, frame, socket_id);
            let relayed = self.accept(Acknowledged::ByRelay, create, publish).await;
            debug_assert!(relayed.is_ok(), "a relayed event is published whatever the commit");
        }
    }
}

impl Shard {
    /// Counts a client event; false when the connection is over `max` per second.
    fn count_client_event(&self, key: ConnKey, max: u32) -> bool {
        let mut state = self.state.borrow_mut();
        let now_s = state.now_s;
        state.connections[key].client_events.record(now_s, 1) <= max
    }

    /// Closes every connection of a signed-in user, on every shard, with 4009.
    pub fn terminate_user(&self, app: AppIndex, user_id: &str) {
        self.terminate_user_locally(app, user_id);
        for target in (0..self.mesh.shards()).filter(|&t| t != self.index) {
            self.mesh_send(target, MeshMessage::TerminateUser { app, user_id: user_id.into() });
        }
    }

    pub(super) fn terminate_user_locally(&self, app: AppIndex, user_id: &str) {
        let keys: Vec<ConnKey> = {
            let state = self.state.borrow();
            state
                .connections
                .iter()
                .filter(|(_, c)| c.app == app && c.user_id.as_deref() == Some(user_id))
                .map(|(k, _)| k)
                .collect()
        };
        for key in keys {
            self.refuse(key, 4009, "Connection terminated by the server");
        }
    }

    /// `pusher:signin`: verifies `socket_id::user::user_data`, remembers the user id and
    /// answers `pusher:signin_success`; a bad sign-in is refused with 4009 (Pusher's auth
    /// signatures: https://pusher.com/docs/channels/library_auth_reference/auth-signatures/).
    fn signin(&self, key: ConnKey, signin: &Signin) {
        let (app_index, socket_id) = {
            let state = self.state.borrow();
            let conn = &state.connections[key];
            (conn.app, conn.socket_id)
        };
        let apps = self.apps();
        let app = apps.get(app_index);
        let to_sign = format!("{socket_id}::user::{}", signin.user_data);
        let user = check_auth(&app.config.key, &app.secret_key, &to_sign, Some(&signin.auth))
            .and_then(|()| parse_user(&signin.user_data));
        let (user_id, watchlist) = match user {
            Ok(user) => user,
            Err(reason) => return self.refuse(key, 4009, &reason),
        };
        let previous = {
            let mut state = self.state.borrow_mut();
            let conn = &mut state.connections[key];
            conn.authorized = true;
            let previous = conn.user_id.replace(user_id.clone()).map(|id| (id, std::mem::take(&mut conn.watchlist)));
            conn.watchlist = watchlist.clone();
            previous
        };
        self.send(key, message::signin_success(&signin.user_data));
        let watcher = Watcher { shard: self.index, conn: key, socket_id };
        // Signing in again replaces the previous identity, with everything that belonged to
        // it: the old user's #server-to-user- channel would otherwise keep delivering that
        // user's events to a socket that terminate_connections no longer finds under it.
        if let Some((old_id, old_watchlist)) = previous {
            if old_id != user_id {
                self.unsubscribe(key, &format!("{}{old_id}", channel::SERVER_TO_USER_PREFIX));
            }
            for watched in old_watchlist {
                self.watch(app_index, watched, watcher, false);
            }
            self.user_presence(app_index, old_id, false);
        }
        self.user_presence(app_index, user_id, true);
        for watched in watchlist {
            self.watch(app_index, watched, watcher, true);
        }
    }
}

/// Checks `auth` = `key:hex(HMAC-SHA256(secret, to_sign))`, constant-time on the signature;
/// the key part must be the app's own: the whole `key:signature` is compared (Pusher's auth
/// signatures: https://pusher.com/docs/channels/library_auth_reference/auth-signatures/).
pub fn check_auth(app_key: &str, secret: &hmac::Key, to_sign: &str, auth: Option<&str>) -> Result<(), String> {
    let auth = auth.unwrap_or("");
    let expected = || format!("Invalid signature: Expected HMAC SHA256 hex digest of {to_sign}, but got {auth}");
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

    const KEY: &str = "278d425bdf160c739803";

    fn secret() -> hmac::Key {
        hmac::Key::new(hmac::HMAC_SHA256, b"7ad3773142a6692b25b8")
    }

    /// Pusher's documented private-channel vector verifies; tampering does not.
    #[test]
    fn private_channel_vector() {
        let good = "278d425bdf160c739803:58df8b0c36d6982b82c3ecf6b4662e34fe8c25bba48f5369f135bf843651c3a4";
        let to_sign = "1234.1234:private-foobar";
        assert_eq!(check_auth(KEY, &secret(), to_sign, Some(good)), Ok(()));
        assert!(check_auth(KEY, &secret(), to_sign, Some(&good.replace(":58", ":59"))).is_err());
        assert!(check_auth(KEY, &secret(), to_sign, Some(&good.replace("278d", "278e"))).is_err());
        assert!(check_auth(KEY, &secret(), "1234.1234:private-other", Some(good)).is_err());
        assert!(check_auth(KEY, &secret(), to_sign, None).is_err());
    }

    /// Pusher's documented presence vector verifies over the exact channel_data bytes.
    #[test]
    fn presence_channel_vector() {
        let channel_data = r#"{"user_id":10,"user_info":{"name":"Mr. Channels"}}"#;
        let to_sign = format!("1234.1234:presence-foobar:{channel_data}");
        let good = "278d425bdf160c739803:31935e7d86dba64c2a90aed31fdc61869f9b22ba9d8863bba239c03ca481bc80";
        assert_eq!(check_auth(KEY, &secret(), &to_sign, Some(good)), Ok(()));
        let reordered =
            format!("1234.1234:presence-foobar:{}", r#"{"user_info":{"name":"Mr. Channels"},"user_id":10}"#);
        assert!(check_auth(KEY, &secret(), &reordered, Some(good)).is_err());
        assert_eq!(parse_member(channel_data, 1024), Ok(("10".into(), r#"{"name":"Mr. Channels"}"#.into())));
    }

    /// Pusher's documented user-authentication vector (`socket_id::user::user_data`).
    #[test]
    fn signin_vector() {
        let to_sign = r#"1234.1234::user::{"id":"12345"}"#;
        let good = "278d425bdf160c739803:4708d583dada6a56435fb8bc611c77c359a31eebde13337c16ab43aa6de336ba";
        assert_eq!(check_auth(KEY, &secret(), to_sign, Some(good)), Ok(()));
    }

    /// channel_data rules: user_id string or number, bounded; user_info bounded.
    #[test]
    fn member_parsing() {
        assert_eq!(parse_member(r#"{"user_id":"a"}"#, 10), Ok(("a".into(), "null".into())));
        assert!(parse_member(r#"{"user_id":""}"#, 10).is_err());
        assert!(parse_member(r#"{"user_id":true}"#, 10).is_err());
        assert!(parse_member(r#"{"user_info":{}}"#, 10).is_err());
        assert!(parse_member(&format!(r#"{{"user_id":"{}"}}"#, "a".repeat(129)), 10).is_err());
        assert!(parse_member(r#"{"user_id":"a","user_info":{"name":"abcdefghij"}}"#, 10).is_err());
        assert!(parse_member("nope", 10).is_err());
    }
}
