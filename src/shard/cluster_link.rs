//! The shard's side of cluster mode (docs/cluster.md): starts the shard's link supervisor,
//! delivers the bucket messages it hands over, closes a gapped bucket's connections with 4200,
//! and relays this shard's client events through Redis.
//!
//! Wired: fan-out (kinds 1 and 2), and the channel state of `shard::cluster_home` (kinds 3–5);
//! cache and users stay per node (home state), so the supervisor's other kinds are logged and
//! ignored here.
//!
//! Invariant: in cluster mode every publish and client event reaches this node's own
//! subscribers through Redis too (never directly), so all nodes see one order per bucket.

use std::cell::RefCell;
use std::rc::{Rc, Weak};

use bytes::Bytes;

use super::mesh::MeshMessage;
use super::router::ConnKey;
use super::Shard;
use crate::apps::AppIndex;
use crate::cluster::bucket;
use crate::cluster::commands::Commands;
use crate::cluster::link::LinkError;
use crate::cluster::message::{Header, Kind, Sender};
use crate::cluster::outbound::{Outbound, Unavailable};
use crate::cluster::sequence::BucketId;
use crate::cluster::supervisor::{Events, Gap, Supervisor, SupervisorOptions};
use crate::cluster::NodeIdentity;
use crate::pusher::message::{self, SocketId};

/// Close code for connections that may have missed messages: pusher-js reconnects at once
/// (Pusher's protocol: 4200–4299 mean "reconnect immediately").
pub const MISSED_MESSAGES: u16 = 4200;

/// What a shard in cluster mode keeps of its supervisor.
pub struct ClusterHandle {
    /// Where this shard's publishes and client events wait for the command link.
    pub outbound: Rc<Outbound>,
    /// Where its scripts and queries wait for the command link.
    pub commands: Rc<Commands>,
    /// `cluster.buckets`.
    pub buckets: u16,
    /// `cluster.prefix`.
    pub prefix: String,
    /// This node.
    pub node: NodeIdentity,
    /// The shard itself, for the tasks that await script replies.
    pub(super) shard: Weak<Shard>,
    /// Cluster-side state of the home shard (`shard::cluster_home`).
    pub(super) home: RefCell<super::cluster_home::ClusterHome>,
}

impl ClusterHandle {
    /// Publishes through Redis and waits until Redis executed it.
    pub async fn publish(
        &self,
        kind: Kind,
        app: AppIndex,
        channel: &str,
        frame: Bytes,
        exclude: Option<SocketId>,
    ) -> Result<(), Unavailable> {
        self.outbound.send(kind, app, channel, frame, exclude)?.outcome().await
    }
}

/// The supervisor's `Events`, delivered on this shard.
struct ShardEvents {
    shard: Rc<Shard>,
}

impl Events for ShardEvents {
    fn message(&mut self, bucket: BucketId, header: &Header<'_>, frame: Bytes) {
        match header.kind {
            // The frame is a slice of the link's read buffer: every local subscriber, on
            // every shard, queues these same bytes.
            Kind::Publication | Kind::ClientEvent | Kind::SubscriptionCount => {
                self.shard.broadcast(bucket.app, header.channel, frame, header.exclude)
            }
            // Decided once cluster-wide by a script (`shard::cluster_home`); join answers
            // waiting for this place in the stream follow it.
            Kind::MemberAdded | Kind::MemberRemoved => {
                self.shard.broadcast(bucket.app, header.channel, frame, header.exclude);
                self.shard.script_message_seen(bucket, header.sender, header.sequence);
            }
            other => tracing::debug!(kind = ?other, node = header.node_id, "cluster message kind not wired; ignored"),
        }
    }

    fn gap(&mut self, bucket: BucketId, gap: Gap) {
        tracing::warn!(
            shard = self.shard.index,
            app = bucket.app,
            bucket = bucket.number,
            ?gap,
            "messages may be missed in a bucket: closing its connections with 4200"
        );
        self.shard.bucket_gap(bucket.app, bucket.number);
        self.shard.release_held_joins(Some(bucket));
    }

    fn resynced(&mut self, bucket: BucketId, sender: Sender, last: u64) {
        self.shard.script_message_seen(bucket, sender, last);
    }

    fn link_up(&mut self) {
        tracing::info!(shard = self.shard.index, "cluster link up");
        self.shard.cluster_link_up();
    }

    fn link_down(&mut self, error: &LinkError) {
        tracing::warn!(shard = self.shard.index, %error, "cluster link down");
    }
}

impl Shard {
    /// The cluster link, in cluster mode.
    pub fn cluster(&self) -> Option<&ClusterHandle> {
        self.cluster_cell.get()
    }

    /// Whether cluster mode is on and this shard cannot publish through Redis now.
    pub fn cluster_down(&self) -> bool {
        self.cluster().is_some_and(|c| !c.outbound.is_up())
    }

    /// Starts this shard's link supervisor (call once, inside the shard's runtime).
    pub fn start_cluster(self: &Rc<Self>, options: SupervisorOptions) {
        let buckets = options.buckets;
        let (prefix, node) = (options.prefix.clone(), options.node.clone());
        let rng = fastrand::Rng::new();
        let events = ShardEvents { shard: self.clone() };
        let supervisor = Supervisor::new(options, events, self.all_metrics.clone(), rng);
        let handle = ClusterHandle {
            outbound: supervisor.outbound(),
            commands: supervisor.commands(),
            buckets,
            prefix,
            node,
            shard: Rc::downgrade(self),
            home: RefCell::default(),
        };
        assert!(self.cluster_cell.set(handle).is_ok(), "the cluster link starts once");
        monoio::spawn(supervisor.run());
        self.start_cluster_home();
    }

    /// Relays a client event to the channel's other subscribers: through the mesh on a single
    /// node, through Redis in cluster mode (where a refusal is told to the sender as a
    /// `pusher:error`, docs/cluster.md open question 4).
    pub(super) async fn relay(&self, key: ConnKey, app: AppIndex, channel: &str, frame: Bytes, sender: SocketId) {
        let Some(cluster) = self.cluster() else {
            return self.publish(app, channel, frame, Some(sender)).await;
        };
        if cluster.publish(Kind::ClientEvent, app, channel, frame, Some(sender)).await.is_err() {
            self.send(key, relay_refused(channel));
        }
    }

    /// A bucket of `app` may have lost messages: its connections on every shard are closed.
    pub(super) fn bucket_gap(&self, app: AppIndex, number: u16) {
        self.close_bucket(app, number);
        for target in (0..self.mesh.shards()).filter(|&t| t != self.index) {
            self.mesh_send(target, MeshMessage::BucketGap { app, bucket: number });
        }
    }

    /// Closes this shard's connections subscribed (or joining) to a channel of the bucket
    /// with 4200, so their clients reconnect and resubscribe.
    pub(super) fn close_bucket(&self, app: AppIndex, number: u16) {
        let Some(buckets) = self.cluster().map(|c| c.buckets) else { return };
        let keys: Vec<ConnKey> = {
            let state = self.state.borrow();
            let in_bucket = |name: &str| bucket::of_channel(name, buckets) == number;
            let affected =
                state.connections.iter().filter(|(_, c)| c.app == app && c.channels.iter().any(|n| in_bucket(n)));
            affected.map(|(key, _)| key).collect()
        };
        for key in keys {
            self.close(key, MISSED_MESSAGES, "messages may have been missed, reconnect");
        }
    }
}

/// The `pusher:error` a client event gets when it could not be relayed cluster-wide.
pub(super) fn relay_refused(channel: &str) -> Bytes {
    message::error(None, "client event not relayed: cluster unavailable, retry", Some(channel))
}
