//! Unit tests of the pure home state: each change is checked against the exact effects it
//! returns, written as one line per effect.

use std::time::{Duration, Instant};

use bytes::Bytes;

use super::*;
use crate::shard::ConnKey;

const SHARD: usize = 0;

/// The socket_id of test connection `n`.
fn socket(n: u64) -> SocketId {
    SocketId { sequence: n, random: 0 }
}

/// Test connection `n` (on shard `SHARD`) as a watcher.
fn watcher(n: u64) -> Watcher {
    Watcher { shard: SHARD, conn: ConnKey::from_index(n as usize), socket_id: socket(n) }
}

/// A join of connection `n` from shard `from`: a presence member when `user` is given.
fn join(tickets: &mut JoinTickets, from: usize, n: u64, channel: &str, user: Option<&str>, cache: bool) -> HomeJoin {
    HomeJoin {
        from,
        conn: ConnKey::from_index(n as usize),
        socket_id: socket(n),
        ticket: tickets.issue(),
        app: 0,
        channel: channel.into(),
        member: user.map(|u| (u.into(), "null".into())),
        cache,
    }
}

/// The JSON text of a frame (after its WebSocket header).
fn text(frame: &Bytes) -> String {
    let start = frame.iter().position(|&b| b == b'{').expect("a JSON frame");
    String::from_utf8_lossy(&frame[start..]).into_owned()
}

/// The `event` of a frame.
fn event(frame: &Bytes) -> String {
    let text = text(frame);
    let rest = &text[text.find(r#""event":""#).expect("an event") + 9..];
    rest[..rest.find('"').expect("closed")].to_string()
}

/// One line per effect.
fn describe(effects: &[HomeEffect]) -> Vec<String> {
    effects
        .iter()
        .map(|effect| match effect {
            HomeEffect::Broadcast { channel, frame, exclude, .. } => match exclude {
                Some(socket_id) => format!("broadcast {channel} {} except {}", event(frame), socket_id.sequence),
                None => format!("broadcast {channel} {}", event(frame)),
            },
            HomeEffect::SendTo { watcher, frame } => {
                let state = if text(frame).contains("online") { "online" } else { "offline" };
                format!("send {} {} {state}", watcher.socket_id.sequence, event(frame))
            }
            HomeEffect::Lifecycle { channel, kind, .. } => format!("webhook {channel} {kind:?}"),
            HomeEffect::LeaveLater { channel, user_id, .. } => format!("leave later {channel} {user_id}"),
            HomeEffect::Reply { to, reply } => {
                let frames: Vec<String> = reply.frames.iter().map(event).collect();
                let verdict = if reply.accepted { "accepted" } else { "refused" };
                format!("reply to {to} for {}: {verdict} {}", reply.socket_id.sequence, frames.join(" "))
            }
        })
        .collect()
}

/// Asserts the effects, line by line.
fn check(effects: Vec<HomeEffect>, expected: &[&str]) {
    assert_eq!(describe(&effects), expected);
}

/// `member_added` is announced (to all but the joining connection, and as a webhook) once per
/// user, however many connections the user joins with, and on whichever shard.
#[test]
fn member_added_once_per_user() {
    let (mut home, mut tickets, now) = (HomeState::default(), JoinTickets::default(), Instant::now());
    let first = join(&mut tickets, 0, 1, "presence-a", Some("u1"), false);
    check(
        home.join(first, 10, now),
        &[
            "broadcast presence-a pusher_internal:member_added except 1",
            r#"webhook presence-a MemberAdded("u1")"#,
            "reply to 0 for 1: accepted pusher_internal:subscription_succeeded",
        ],
    );
    let second_tab = join(&mut tickets, 1, 2, "presence-a", Some("u1"), false);
    check(home.join(second_tab, 10, now), &["reply to 1 for 2: accepted pusher_internal:subscription_succeeded"]);
    let other = join(&mut tickets, 1, 3, "presence-a", Some("u2"), false);
    let effects = home.join(other, 10, now);
    let HomeEffect::Reply { reply, .. } = effects.last().expect("a reply") else { panic!("the reply comes last") };
    assert!(text(&reply.frames[0]).contains(r#"\"count\":2"#), "the member list has both users");
    assert_eq!(
        describe(&effects)[..2],
        ["broadcast presence-a pusher_internal:member_added except 3", r#"webhook presence-a MemberAdded("u2")"#]
    );
}

/// `member_removed` is announced once, when the user's last connection leaves; a leave of
/// someone who is not a member changes nothing.
#[test]
fn member_removed_on_the_last_leave() {
    let (mut home, mut tickets, now) = (HomeState::default(), JoinTickets::default(), Instant::now());
    for n in [1, 2] {
        home.join(join(&mut tickets, 0, n, "presence-a", Some("u1"), false), 10, now);
    }
    check(home.presence_leave(0, "presence-a".into(), "u1".into(), false), &[]);
    check(
        home.presence_leave(0, "presence-a".into(), "u1".into(), false),
        &["broadcast presence-a pusher_internal:member_removed", r#"webhook presence-a MemberRemoved("u1")"#],
    );
    check(home.presence_leave(0, "presence-a".into(), "u1".into(), false), &[]);
    check(home.presence_leave(0, "presence-b".into(), "u9".into(), false), &[]);
    assert!(home.presence.entries().is_empty());
}

/// With the debounce, the last leave only schedules the removal and holds the channel's
/// vacate; the removal then announces member_removed before channel_vacated.
#[test]
fn debounced_leave_removes_then_vacates() {
    let (mut home, mut tickets, now) = (HomeState::default(), JoinTickets::default(), Instant::now());
    home.join(join(&mut tickets, 0, 1, "presence-a", Some("u1"), false), 10, now);
    check(home.count_subscriptions(0, "presence-a", 1, false), &["webhook presence-a Occupied"]);
    let effects = home.presence_leave(0, "presence-a".into(), "u1".into(), true);
    let [HomeEffect::LeaveLater { ticket, .. }] = effects[..] else { panic!("{:?}", describe(&effects)) };
    check(home.count_subscriptions(0, "presence-a", -1, false), &[]);
    assert!(home.presence.contains(0, "presence-a", "u1"), "still listed during the window");
    check(
        home.presence_leave_due(0, "presence-a".into(), "u1".into(), ticket),
        &[
            "broadcast presence-a pusher_internal:member_removed",
            r#"webhook presence-a MemberRemoved("u1")"#,
            "webhook presence-a Vacated",
        ],
    );
    check(home.presence_leave_due(0, "presence-a".into(), "u1".into(), ticket), &[]);
}

/// A rejoin within the window cancels both the removal and the held vacate: no member
/// events, no channel_vacated/channel_occupied pair.
#[test]
fn rejoin_within_the_window_cancels_removal_and_vacate() {
    let (mut home, mut tickets, now) = (HomeState::default(), JoinTickets::default(), Instant::now());
    home.join(join(&mut tickets, 0, 1, "presence-a", Some("u1"), false), 10, now);
    check(home.count_subscriptions(0, "presence-a", 1, false), &["webhook presence-a Occupied"]);
    check(home.presence_leave(0, "presence-a".into(), "u1".into(), true), &["leave later presence-a u1"]);
    check(home.count_subscriptions(0, "presence-a", -1, false), &[]);
    check(
        home.join(join(&mut tickets, 1, 2, "presence-a", Some("u1"), false), 10, now),
        &["reply to 1 for 2: accepted pusher_internal:subscription_succeeded"],
    );
    check(home.count_subscriptions(0, "presence-a", 1, false), &[]);
    let leaving = home.presence.leaving();
    assert!(leaving.is_empty(), "{leaving:?}");
}

/// A full presence channel refuses a new user (no announcement, no cache lookup) but not
/// another connection of a member.
#[test]
fn a_full_channel_refuses_new_users_only() {
    let (mut home, mut tickets, now) = (HomeState::default(), JoinTickets::default(), Instant::now());
    home.join(join(&mut tickets, 0, 1, "presence-cache-a", Some("u1"), true), 1, now);
    check(
        home.join(join(&mut tickets, 1, 2, "presence-cache-a", Some("u2"), true), 1, now),
        &["reply to 1 for 2: refused pusher:error"],
    );
    check(
        home.join(join(&mut tickets, 1, 3, "presence-cache-a", Some("u1"), true), 1, now),
        &[
            "webhook presence-cache-a CacheMiss",
            "reply to 1 for 3: accepted pusher_internal:subscription_succeeded pusher:cache_miss",
        ],
    );
}

/// `channel_occupied` and `channel_vacated` come once per transition (deltas from several
/// shards add up), and an unannounced channel's count is forgotten at zero.
#[test]
fn occupied_and_vacated_once() {
    let mut home = HomeState::default();
    check(home.count_subscriptions(0, "private-a", 1, false), &["webhook private-a Occupied"]);
    check(home.count_subscriptions(0, "private-a", 1, false), &[]);
    check(home.count_subscriptions(0, "private-a", -1, false), &[]);
    check(home.count_subscriptions(0, "private-a", -1, false), &["webhook private-a Vacated"]);
    assert_eq!(home.subscription_counts().count(), 0);
}

/// Announced counts go out once per tick with the latest value, and an emptied channel is
/// forgotten without an announcement.
#[test]
fn subscription_counts_are_announced_once_per_tick() {
    let mut home = HomeState::default();
    check(home.count_subscriptions(0, "public-a", 1, true), &["webhook public-a Occupied"]);
    check(home.count_subscriptions(0, "public-a", 1, true), &[]);
    check(
        home.announce_subscription_counts(),
        &["broadcast public-a pusher_internal:subscription_count", "webhook public-a SubscriptionCount(2)"],
    );
    check(home.announce_subscription_counts(), &[]);
    home.count_subscriptions(0, "public-a", -1, true);
    check(home.count_subscriptions(0, "public-a", -1, true), &["webhook public-a Vacated"]);
    check(home.announce_subscription_counts(), &[]);
    assert_eq!(home.subscription_counts().count(), 0);
}

/// A cache channel's join gets the stored event after subscription_succeeded, or cache_miss
/// (and its webhook) when there is none or it expired.
#[test]
fn cache_replay_and_miss() {
    let (mut home, mut tickets, now) = (HomeState::default(), JoinTickets::default(), Instant::now());
    check(
        home.join(join(&mut tickets, 0, 1, "cache-a", None, true), 10, now),
        &[
            "webhook cache-a CacheMiss",
            "reply to 0 for 1: accepted pusher_internal:subscription_succeeded pusher:cache_miss",
        ],
    );
    let stored = crate::ws::frame::encode_text(br#"{"event":"stored","channel":"cache-a","data":"{}"}"#);
    home.cache_store(0, "cache-a", stored, "{}", now + Duration::from_secs(30));
    check(
        home.join(join(&mut tickets, 1, 2, "cache-a", None, true), 10, now),
        &["reply to 1 for 2: accepted pusher_internal:subscription_succeeded stored"],
    );
    assert_eq!(
        home.cached(0, "cache-a", now + Duration::from_secs(10)).map(|(_, data, left)| (data, left)),
        Some(("{}".into(), 20))
    );
    assert!(home.cached(0, "cache-a", now + Duration::from_secs(30)).is_none(), "expired");
    assert_eq!(home.cache_len(), 0, "an expired event is dropped when looked up");
}

/// Watchers hear `online` when a user's first connection signs in (or at once when they start
/// watching an online user) and `offline` when the last one ends; stopped watchers hear nothing.
#[test]
fn watchlist_online_and_offline() {
    let mut home = HomeState::default();
    check(home.watch(0, "u1".into(), watcher(1), true), &[]);
    check(home.user_presence(0, "u1".into(), true), &["send 1 pusher_internal:watchlist_events online"]);
    check(home.user_presence(0, "u1".into(), true), &[]);
    check(home.watch(0, "u1".into(), watcher(2), true), &["send 2 pusher_internal:watchlist_events online"]);
    check(home.user_presence(0, "u1".into(), false), &[]);
    check(
        home.user_presence(0, "u1".into(), false),
        &["send 1 pusher_internal:watchlist_events offline", "send 2 pusher_internal:watchlist_events offline"],
    );
    check(home.user_presence(0, "u1".into(), false), &[]);
    check(home.watch(0, "u1".into(), watcher(1), false), &[]);
    check(home.user_presence(0, "u1".into(), true), &["send 2 pusher_internal:watchlist_events online"]);
}

/// A reply to a join nobody gave up is the connection's to judge; a given-up join is undone
/// (the member leaves) only when its reply says it was counted, and only once.
#[test]
fn join_tickets() {
    let mut tickets = JoinTickets::default();
    let [first, second, third] = [tickets.issue(), tickets.issue(), tickets.issue()];
    assert!(first != second && second != third, "tickets are unique");
    assert_eq!(tickets.answered(first, true), Answered::Wanted);
    tickets.cancel(second, (0, "presence-a".into(), "u1".into()));
    tickets.cancel(third, (0, "presence-a".into(), "u1".into()));
    assert_eq!(tickets.answered(second, true), Answered::Undo((0, "presence-a".into(), "u1".into())));
    assert_eq!(tickets.answered(third, false), Answered::Dropped, "a refused join was never counted");
    assert!(tickets.is_idle());
    assert_eq!(tickets.answered(second, true), Answered::Wanted, "a cancellation is used once");
}
