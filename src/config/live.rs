//! Which keys a reload applies to a running node, and which wait for a restart.
//!
//! Owns `running_config`, a pure function of the running and the new config. Never applies
//! anything (`Server::reload` does, through the mesh).
//!
//! Applied live (new connections and requests read them; a connection reads its limits once,
//! when it starts): all of `[http]` and `[dashboard]`; `[websocket]` except the two timeouts
//! below; `server.connections_per_shard_max` and the shutdown windows; `[webhooks]` except the
//! keys below. Restart only: what is bound, spawned or opened at start — `server.bind`,
//! `server.shards`, `server.io_driver`, `server.backlog`, all of `[mesh]` and `[cluster]`, and
//! `webhooks.{data_dir, durability, batch_sync_ms, segment_bytes_max, ca_file, dns_timeout_ms,
//! dns_threads, dns_cache_ttl_ms, connections_per_endpoint_max}` — and
//! `websocket.{activity_timeout_s, pong_timeout_s}`: every open client was told its activity
//! timeout in `pusher:connection_established` and pings at that pace, so the shard's liveness
//! sweep must keep judging it by that value. `[tls]` and `[[apps]]` are `Server::reload`'s own.

use super::Config;

/// Sets `$running.$field` back to `$old.$field` and names the key when the new file changed it.
macro_rules! restart_only {
    ($restart:ident, $running:expr, $old:expr, $section:literal, [$($field:ident),+]) => {
        $(
            if $running.$field != $old.$field {
                $restart.push(concat!($section, ".", stringify!($field)));
                $running.$field = $old.$field.clone();
            }
        )+
    };
}

/// The config to run after a reload from `old` to `new`: `new`'s live keys, `old`'s restart-only
/// keys and apps (`Server::reload` swaps those itself), with the restart-only keys `new`
/// changed, by name.
pub fn running_config(old: &Config, new: &Config) -> (Config, Vec<&'static str>) {
    let mut restart = Vec::new();
    let mut running = Config { apps: old.apps.clone(), tls: old.tls.clone(), ..new.clone() };
    restart_only!(restart, running.server, old.server, "server", [bind, shards, io_driver, backlog]);
    restart_only!(restart, running.websocket, old.websocket, "websocket", [activity_timeout_s, pong_timeout_s]);
    restart_only!(restart, running.mesh, old.mesh, "mesh", [ring_capacity]);
    #[rustfmt::skip]
    restart_only!(restart, running.cluster, old.cluster, "cluster", [redis_url, node_id, prefix, lease_ms,
        connect_timeout_ms, command_timeout_ms, reply_bytes_max, pipeline_bytes_max, buckets, senders_max,
        connections_refresh_ms]);
    #[rustfmt::skip]
    restart_only!(restart, running.webhooks, old.webhooks, "webhooks", [data_dir, durability, batch_sync_ms,
        segment_bytes_max, ca_file, dns_timeout_ms, dns_threads, dns_cache_ttl_ms, connections_per_endpoint_max]);
    // A key added to `[mesh]` or `[cluster]` and not listed above would otherwise apply live
    // unnoticed; everything in them is bound at start.
    debug_assert!(running.mesh == old.mesh && running.cluster == old.cluster, "a [mesh] or [cluster] key is unlisted");
    (running, restart)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Live keys come from the new file, restart-only keys stay as they run and are named,
    /// apps and TLS are left to the caller.
    #[test]
    fn live_keys_apply_and_restart_keys_are_named() {
        let old = Config::default();
        let mut new = Config::default();
        new.websocket.message_bytes_max = 100;
        new.http.body_bytes_max = 1000;
        new.server.connections_per_shard_max = 7;
        new.server.bind = "127.0.0.1:7001".parse().unwrap();
        new.server.shards = 3;
        new.mesh.ring_capacity = 8;
        new.websocket.pong_timeout_s = 5;
        new.webhooks.retry_schedule_ms = vec![0, 5];
        new.webhooks.durability = crate::config::DurabilityMode::Memory;
        new.cluster.buckets = 8;
        new.apps.clear();
        let (running, restart) = running_config(&old, &new);
        assert_eq!(
            restart,
            [
                "server.bind",
                "server.shards",
                "websocket.pong_timeout_s",
                "mesh.ring_capacity",
                "cluster.buckets",
                "webhooks.durability"
            ]
        );
        assert_eq!((running.websocket.message_bytes_max, running.http.body_bytes_max), (100, 1000));
        assert_eq!(running.server.connections_per_shard_max, 7);
        assert_eq!(running.webhooks.retry_schedule_ms, [0, 5]);
        assert_eq!((running.server.bind, running.server.shards), (old.server.bind, old.server.shards));
        assert_eq!((running.mesh.clone(), running.cluster.clone()), (old.mesh.clone(), old.cluster.clone()));
        assert_eq!(running.webhooks.durability, old.webhooks.durability);
        assert_eq!(running.apps, old.apps);
        assert_eq!(running_config(&old, &old), (old.clone(), Vec::new()), "no change, nothing named");
    }
}
