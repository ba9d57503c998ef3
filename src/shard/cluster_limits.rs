//! Cluster-wide app limits (docs/cluster.md, "Cluster-wide queries and limits"):
//! `backend_events_per_second_max` counted in Redis per second of Redis's clock (one round trip
//! per publish request, before anything is created for it), and `max_connections` over this
//! node's count plus the other nodes' last shared counts, which shard 0 writes and reads every
//! `cluster.connections_refresh_ms`. Over-admission is bounded by what the other nodes admit
//! between two refreshes.

use std::rc::Rc;
use std::time::Duration;

use super::Shard;
use crate::apps::App;
use crate::cluster::limits;
use crate::cluster::outbound::Unavailable;

/// An entry not refreshed for this many refresh periods is a node that died or left: it no
/// longer counts.
const CONNECTIONS_STALE_PERIODS: u64 = 3;

impl Shard {
    /// Cluster mode: admits `events` published events of `app` against its
    /// `backend_events_per_second_max` over every node; `Unavailable` when Redis cannot say.
    pub async fn cluster_admit_events(&self, app: &App, events: u32) -> Result<bool, Unavailable> {
        let limit = app.config.backend_events_per_second_max;
        let Some(cluster) = self.cluster().filter(|_| limit > 0) else { return Ok(true) };
        let command = limits::admit_events(&cluster.prefix, &app.config.id, events, limit);
        let replies = cluster.commands.request(vec![command])?.replies().await?;
        match replies.first().map(limits::admitted) {
            Some(Ok(admitted)) => Ok(admitted),
            Some(Err(reason)) => {
                tracing::error!(reason, "the events-per-second script failed");
                Err(Unavailable)
            }
            None => Err(Unavailable),
        }
    }

    /// Shard 0 in cluster mode: every `cluster.connections_refresh_ms`, shares the node's
    /// connections of every app with a connection limit and reads the other nodes'.
    pub(super) fn start_connection_sharing(self: &Rc<Self>) {
        let refresh_ms = self.config().cluster.connections_refresh_ms;
        let shard = Rc::downgrade(self);
        monoio::spawn(async move {
            loop {
                monoio::time::sleep(Duration::from_millis(refresh_ms)).await;
                let Some(shard) = shard.upgrade() else { return };
                shard.share_connections(refresh_ms * CONNECTIONS_STALE_PERIODS).await;
            }
        });
    }

    /// One refresh; while the link is down the last values stay (the node admits no new
    /// WebSockets then anyway). With the dashboard on, every app's connections are shared and
    /// the node's totals too, in the same pipeline, for its cluster view (docs/dashboard.md).
    async fn share_connections(&self, stale_ms: u64) {
        let Some(cluster) = self.cluster() else { return };
        let apps = self.apps();
        let dashboard = self.config().dashboard.enabled;
        let shared: Vec<&App> =
            apps.list.iter().filter(|a| !a.removed && (dashboard || a.config.max_connections > 0)).collect();
        if shared.is_empty() {
            return;
        }
        let node = &cluster.node;
        let mut commands: Vec<_> = shared
            .iter()
            .map(|a| limits::share_connections(&cluster.prefix, &a.config.id, node, a.connections(), stale_ms))
            .collect();
        if dashboard {
            let sum = |counter: fn(&crate::metrics::ShardMetrics) -> &std::sync::atomic::AtomicU64| -> u64 {
                self.all_metrics.iter().map(|m| counter(m).load(std::sync::atomic::Ordering::Relaxed)).sum()
            };
            let totals = [sum(|m| &m.connections), sum(|m| &m.messages_in_total), sum(|m| &m.messages_out_total)];
            commands.extend(crate::cluster::dashboard::share_totals(&cluster.prefix, node, totals, stale_ms));
        }
        let Ok(asked) = cluster.commands.request(commands) else { return };
        let Ok(replies) = asked.replies().await else { return };
        for (app, reply) in shared.iter().zip(&replies) {
            match limits::elsewhere(reply) {
                Ok(connections) => app.set_elsewhere(connections),
                Err(reason) => tracing::error!(reason, app = app.config.id, "the connections script failed"),
            }
        }
    }
}
