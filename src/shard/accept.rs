//! The accept rule: when an event that causes webhooks counts as accepted, in one place for
//! both kinds of sender (the HTTP API's publishes and clients' `client-*` events).
//!
//! 1. Create the webhook records (deliveries or lifecycle events) before the event reaches
//!    anyone, so no subscriber sees an event whose webhook could still be refused.
//! 2. Publish, and 3. commit the records (the WAL group commit, `webhooks.durability`), in the
//!    order that puts the commit before the moment the sender learns of the acceptance:
//!    - the API sender learns it from the HTTP answer, so the event is published first and the
//!      answer waits for the commit (the fan-out overlaps the fsync; a failed commit answers
//!      503 although subscribers already have the event, and the client retries);
//!    - a client event's sender learns it when the event is relayed (the design's "accepted
//!      when relayed"), so the commit comes first; a failed commit is logged and the event is
//!      relayed anyway, as a client has no answer to carry a refusal.
//! 4. Acknowledge (answer, or the relay itself).

use std::future::Future;

use super::Shard;
use crate::wal::Lsn;
use crate::webhook::dispatch::Refused;

/// How the sender of an event learns that it was accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Acknowledged {
    /// By an answer sent after the publish (the HTTP API): create, publish, commit, answer.
    ByAnswer,
    /// By the relay itself (client events): create, commit, publish.
    ByRelay,
}

/// Why an event was not accepted.
#[derive(Debug)]
pub enum NotAccepted<E> {
    /// Record creation refused it; nothing was published.
    Refused(E),
    /// Published, but its records could not be committed (`Acknowledged::ByAnswer` only).
    NotDurable(Refused),
}

impl Shard {
    /// Accepts an event by the accept rule (see the module documentation): runs `create`
    /// (which returns the WAL position that makes its records durable, if any), then
    /// `publish` and the commit in the order `acknowledged` requires, and returns what
    /// `publish` returned. The caller acknowledges only on `Ok`.
    pub async fn accept<T, E>(
        &self,
        acknowledged: Acknowledged,
        create: impl FnOnce() -> Result<Option<Lsn>, E>,
        publish: impl Future<Output = T>,
    ) -> Result<T, NotAccepted<E>> {
        let durable_at = create().map_err(NotAccepted::Refused)?;
        match acknowledged {
            Acknowledged::ByAnswer => {
                let published = publish.await;
                self.commit_records(durable_at).await.map_err(NotAccepted::NotDurable)?;
                Ok(published)
            }
            Acknowledged::ByRelay => {
                if let Err(error) = self.commit_records(durable_at).await {
                    tracing::error!(%error, "client_event webhook not durable; relaying the event anyway");
                }
                Ok(publish.await)
            }
        }
    }

    /// Waits until the records up to `durable_at` are committed (at once without records or
    /// without webhooks).
    async fn commit_records(&self, durable_at: Option<Lsn>) -> Result<(), Refused> {
        match (durable_at, self.webhooks()) {
            (Some(lsn), Some(webhooks)) => webhooks.commit(lsn).await,
            _ => Ok(()),
        }
    }
}
