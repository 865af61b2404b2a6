//! Delivery: workers claim due messages from the store, hand them to their
//! providers in batches, and write the outcomes back.
//!
//! ```text
//! store ──claim (lease)──▶ group by provider ──send──▶ outcomes ──apply──▶ store
//! ```
//!
//! - Delivered: the message is removed (and a receipt remembered when the
//!   provider has them, e.g. Expo).
//! - Retry: rescheduled with exponential backoff and jitter, no sooner than
//!   the provider's `Retry-After`, until the message's TTL runs out.
//! - Gone: the registration is marked gone; its endpoint answers 410.
//! - Failed: removed and counted.
//!
//! Each provider has its own workers, which claim only that provider's
//! messages: a slow or failing provider (an outage, bad credentials) never
//! holds up the others.
//!
//! A fresh push does not wait for a claim: ingress queues it already leased
//! to its own process and hands it to the provider's workers through a
//! bounded in-memory lane, so the hot path costs the store one insert and
//! one delete, and no claim. The row is the durable copy: if the process
//! dies, the lease runs out and any claimer delivers it. When the lane is
//! full (the workers are behind) a push is queued unleased and waits for a
//! claim like a retry does.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use push_relay_providers::{Notification, Outcome, Provider, Receipt, ReceiptOutcome};
use rand::Rng;
use tokio::sync::{mpsc, Notify};

use crate::metrics::Metrics;
use crate::store::{Claimed, Millis, PendingReceipt, ReceiptTicket, RegistrationState, Store, Update};

/// How often a receipt that was not ready is checked again, and how many
/// times before giving up on it.
const RECEIPT_RECHECK_MS: Millis = 60_000;
const RECEIPT_MAX_CHECKS: u32 = 10;
/// Receipts per claim.
const RECEIPT_BATCH: usize = 1000;
/// How long a worker that found less than half a batch of fresh pushes
/// waits for more before sending. Every provider request, receipt and
/// commit has a cost of its own: under load, fuller batches made the relay
/// 7 % (PostgreSQL) to 14 % (SQLite) faster in the benchmark, for 1 ms of
/// delivery latency.
const GATHER: Duration = Duration::from_millis(1);

pub fn now_ms() -> Millis {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as Millis)
        .unwrap_or(0)
}

pub struct Dispatcher {
    store: Arc<dyn Store>,
    providers: HashMap<String, Arc<dyn Provider>>,
    metrics: Arc<Metrics>,
    queue: push_relay_config::Queue,
    /// One lane per provider: its wake-up and its hand-off from ingress.
    lanes: HashMap<String, Arc<Lane>>,
    /// Latest delivery per registration since the last flush: written to the
    /// store once a second, not once per message (see [`Update::LastDelivery`]).
    last_deliveries: Mutex<HashMap<String, Millis>>,
}

/// A fresh message handed from ingress to a worker, with the end of the
/// lease it was queued under.
struct Handed {
    claimed: Claimed,
    lease_until: Millis,
}

/// A provider's workers' inbox.
struct Lane {
    /// Signalled when a message for the provider is queued or handed over.
    wake: Notify,
    sender: mpsc::Sender<Handed>,
    /// Shared by the provider's workers; held only to take what is waiting.
    inbox: Mutex<mpsc::Receiver<Handed>>,
}

impl Lane {
    fn new(capacity: usize) -> Lane {
        let (sender, inbox) = mpsc::channel(capacity.max(1));
        Lane { wake: Notify::new(), sender, inbox: Mutex::new(inbox) }
    }

    /// Takes up to `max` handed messages whose lease lasts past
    /// `lease_at_least`. One that waited too long in the lane is skipped: a
    /// claimer may take it once its lease ends, and sending it from here as
    /// well could deliver it twice. It is delivered from the store instead.
    fn take(&self, max: usize, lease_at_least: Millis) -> Vec<Claimed> {
        let mut taken = Vec::new();
        // A poisoned lock only means another worker panicked while taking:
        // the channel itself is intact.
        let mut inbox = self.inbox.lock().unwrap_or_else(|e| e.into_inner());
        while taken.len() < max {
            match inbox.try_recv() {
                Ok(handed) if handed.lease_until >= lease_at_least => taken.push(handed.claimed),
                Ok(stale) => tracing::debug!(message = %stale.claimed.message.id, "handed-off message left to a claim: its lease is running out"),
                Err(_) => break,
            }
        }
        taken
    }

    /// Everything still waiting, for [`Dispatcher::shutdown`].
    fn drain(&self) -> Vec<String> {
        let mut inbox = self.inbox.lock().unwrap_or_else(|e| e.into_inner());
        std::iter::from_fn(|| inbox.try_recv().ok()).map(|h| h.claimed.message.id).collect()
    }
}

/// A place in a provider's lane, taken before the message is queued.
pub struct Reservation {
    permit: mpsc::OwnedPermit<Handed>,
    lane: Arc<Lane>,
    lease_until: Millis,
}

impl Reservation {
    /// The lease to queue the message under.
    pub fn lease_until(&self) -> Millis {
        self.lease_until
    }

    /// Hands the queued message to a worker.
    pub fn hand_off(self, claimed: Claimed) {
        self.permit.send(Handed { claimed, lease_until: self.lease_until });
        self.lane.wake.notify_one();
    }
}

impl Dispatcher {
    pub fn new(
        store: Arc<dyn Store>,
        providers: HashMap<String, Arc<dyn Provider>>,
        metrics: Arc<Metrics>,
        queue: push_relay_config::Queue,
    ) -> Arc<Dispatcher> {
        // Room for what all of a provider's workers take in one round.
        let capacity = queue.workers.saturating_mul(queue.batch_size);
        let lanes = providers.keys().map(|name| (name.clone(), Arc::new(Lane::new(capacity)))).collect();
        Arc::new(Dispatcher { store, providers, metrics, queue, lanes, last_deliveries: Mutex::default() })
    }

    /// Starts the delivery workers, the receipt checker and housekeeping.
    pub fn spawn(self: &Arc<Self>) {
        for name in self.providers.keys() {
            for _ in 0..self.queue.workers {
                let (me, name) = (self.clone(), name.clone());
                tokio::spawn(async move { me.work(&name).await });
            }
        }
        let me = self.clone();
        tokio::spawn(async move { me.check_receipts().await });
        let me = self.clone();
        tokio::spawn(async move { me.housekeeping().await });
    }

    /// Tells an idle worker of `provider` that a message was queued.
    pub fn wake(&self, provider: &str) {
        if let Some(lane) = self.lanes.get(provider) {
            lane.wake.notify_one();
        }
    }

    /// A place in `provider`'s lane for a message about to be queued, with
    /// the lease to queue it under; `None` when the lane is full.
    pub fn reserve(&self, provider: &str) -> Option<Reservation> {
        let lane = self.lanes.get(provider)?;
        let permit = lane.sender.clone().try_reserve_owned().ok()?;
        let lease_until = now_ms() + self.lease_ms();
        Some(Reservation { permit, lane: lane.clone(), lease_until })
    }

    /// At shutdown: writes the latest deliveries, and gives the messages
    /// still waiting in the lanes back to the queue at once, instead of when
    /// their leases run out (which would hold them back from the other
    /// processes sharing the store).
    pub async fn shutdown(&self) {
        self.flush_last_deliveries().await;
        let ids: Vec<String> = self.lanes.values().flat_map(|lane| lane.drain()).collect();
        if ids.is_empty() {
            return;
        }
        match self.store.extend_lease(&ids, 0).await {
            Ok(()) => tracing::info!("{} queued messages released for other processes", ids.len()),
            Err(e) => tracing::warn!("cannot release {} queued messages (they return when their lease ends): {e}", ids.len()),
        }
    }

    fn note_delivery(&self, registration: &str, at: Millis) {
        let mut last = self.last_deliveries.lock().unwrap_or_else(|e| e.into_inner());
        match last.get_mut(registration) {
            Some(kept) => *kept = (*kept).max(at),
            None => {
                last.insert(registration.to_owned(), at);
            }
        }
    }

    async fn flush_last_deliveries(&self) {
        let last = std::mem::take(&mut *self.last_deliveries.lock().unwrap_or_else(|e| e.into_inner()));
        if last.is_empty() {
            return;
        }
        let updates: Vec<Update> =
            last.into_iter().map(|(registration, at)| Update::LastDelivery { registration, at }).collect();
        if let Err(e) = self.store.apply(&updates).await {
            // Informational only (the registration view): not retried.
            tracing::warn!("cannot record the latest delivery of {} registrations: {e}", updates.len());
        }
    }

    fn lease_ms(&self) -> Millis {
        i64::from(self.queue.lease_secs) * 1000
    }

    fn poll_interval(&self) -> Duration {
        Duration::from_millis(self.queue.poll_interval_ms)
    }

    /// A worker: delivers what ingress hands over and, when there is none
    /// or a poll interval has passed, what the store has due (retries,
    /// messages of a dead process, pushes that found the lane full).
    async fn work(&self, provider: &str) {
        let Some(lane) = self.lanes.get(provider) else { return };
        let mut last_claim: Option<Instant> = None;
        loop {
            let now = now_ms();
            let lease_until = now + self.lease_ms();
            // A handed message is sent only with at least half its lease
            // left: the first renewal comes a third of a lease in.
            let mut batch = lane.take(self.queue.batch_size, now + self.lease_ms() / 2);
            if !batch.is_empty() && batch.len() < self.queue.batch_size / 2 {
                // Pushes are arriving one by one: wait a moment for more, so
                // that the provider request, the receipt and the store's
                // commit are shared by more of them.
                tokio::time::sleep(GATHER).await;
                let more = lane.take(self.queue.batch_size - batch.len(), now + self.lease_ms() / 2);
                batch.extend(more);
            }
            let room = self.queue.batch_size.saturating_sub(batch.len());
            let claim_due = batch.is_empty() || last_claim.is_none_or(|at| at.elapsed() >= self.poll_interval());
            let mut failed = false;
            if room > 0 && claim_due {
                last_claim = Some(Instant::now());
                match self.store.claim(provider, now, room, lease_until).await {
                    Ok(claimed) => batch.extend(claimed),
                    Err(e) => {
                        tracing::warn!(provider, "cannot claim messages: {e}");
                        failed = true;
                    }
                }
            }
            if !batch.is_empty() {
                let ids: Vec<String> = batch.iter().map(|c| c.message.id.clone()).collect();
                tokio::select! {
                    _ = self.deliver(provider, batch) => {}
                    _ = self.renew_lease(&ids) => {}
                }
                // More may be due: go on without waiting.
            } else if failed {
                tokio::time::sleep(self.poll_interval()).await;
            } else {
                let _ = tokio::time::timeout(self.poll_interval(), lane.wake.notified()).await;
            }
        }
    }

    /// Renews the lease of a batch being delivered every third of a lease,
    /// for as long as delivery takes (it never returns by itself).
    async fn renew_lease(&self, ids: &[String]) {
        let lease = Duration::from_secs(u64::from(self.queue.lease_secs));
        let mut tick = tokio::time::interval(lease / 3);
        tick.tick().await; // the first tick is immediate: the claim just set it
        loop {
            tick.tick().await;
            let lease_until = now_ms() + lease.as_millis() as Millis;
            if let Err(e) = self.store.extend_lease(ids, lease_until).await {
                tracing::warn!("cannot renew the lease of {} messages being delivered: {e}", ids.len());
            }
        }
    }

    /// Delivers a claimed batch of `name`'s messages and records the outcomes.
    async fn deliver(&self, name: &str, batch: Vec<Claimed>) {
        let Some(provider) = self.providers.get(name) else { return };
        let now = now_ms();
        let mut updates = Vec::with_capacity(batch.len());
        let mut sendable = Vec::with_capacity(batch.len());
        for claimed in &batch {
            let m = &claimed.message;
            let reason = if claimed.state != RegistrationState::Active {
                "inactive"
            } else if m.expires_at <= now {
                "expired"
            } else {
                sendable.push(claimed);
                continue;
            };
            self.metrics.dropped.with_label_values(&[reason]).inc();
            updates.push(Update::Drop { message: m.id.clone(), registration: m.registration.clone(), failed: false });
        }
        for chunk in sendable.chunks(provider.max_batch().max(1)) {
            let now = now_ms();
            let notifications: Vec<Notification> = chunk.iter().map(|c| notification(c, now)).collect();
            let outcomes = provider.send(&notifications).await;
            let now = now_ms();
            let mut tickets = Vec::new();
            for (claimed, outcome) in chunk.iter().zip(outcomes.iter().chain(std::iter::repeat(&MISSING))) {
                self.record(name, claimed, outcome, now, &mut updates, &mut tickets);
            }
            updates.extend(receipts_later(name, provider.as_ref(), tickets, now));
        }
        if let Err(e) = self.store.apply(&updates).await {
            // The leases run out and the messages are tried again: delivery
            // is at least once, never lost.
            tracing::error!(provider = name, "cannot record delivery outcomes: {e}");
        }
    }

    /// Turns one provider outcome into store updates and metrics.
    fn record(
        &self,
        name: &str,
        claimed: &Claimed,
        outcome: &Outcome,
        now: Millis,
        updates: &mut Vec<Update>,
        tickets: &mut Vec<ReceiptTicket>,
    ) {
        let m = &claimed.message;
        self.metrics.deliveries.with_label_values(&[name, outcome.label()]).inc();
        match outcome {
            Outcome::Delivered { receipt } => {
                self.metrics
                    .delivery_seconds
                    .with_label_values(&[name])
                    .observe((now - m.created_at).max(0) as f64 / 1000.0);
                updates.push(Update::Delivered { message: m.id.clone() });
                self.note_delivery(&m.registration, now);
                if let Some(id) = receipt {
                    tickets.push(ReceiptTicket {
                        id: id.clone(),
                        registration: m.registration.clone(),
                        token: claimed.token.clone(),
                    });
                }
            }
            Outcome::Retry { after, reason } => {
                let attempts = m.attempts.saturating_add(1);
                let delay = backoff(&self.queue, attempts).max(after.unwrap_or_default());
                let next = now + delay.as_millis() as Millis;
                if next >= m.expires_at {
                    tracing::info!(registration = %m.registration, attempts, "message expired while retrying: {reason}");
                    self.metrics.dropped.with_label_values(&["expired"]).inc();
                    updates.push(Update::Drop { message: m.id.clone(), registration: m.registration.clone(), failed: true });
                } else {
                    tracing::debug!(registration = %m.registration, attempts, delay_ms = delay.as_millis() as u64, "retrying: {reason}");
                    updates.push(Update::Retry { message: m.id.clone(), attempts, next_attempt_at: next });
                }
            }
            Outcome::Gone { reason } => {
                tracing::info!(registration = %m.registration, provider = name, "device token is gone: {reason}");
                self.metrics.registrations.with_label_values(&["gone"]).inc();
                self.metrics.dropped.with_label_values(&["gone"]).inc();
                updates.push(Update::Gone { registration: m.registration.clone(), token: claimed.token.clone() });
            }
            Outcome::Failed { reason } => {
                tracing::warn!(registration = %m.registration, provider = name, "delivery failed: {reason}");
                self.metrics.dropped.with_label_values(&["failed"]).inc();
                updates.push(Update::Drop { message: m.id.clone(), registration: m.registration.clone(), failed: true });
            }
        }
    }

    /// TTL 0 (RFC 8030 §5.2): one immediate attempt; never stored.
    pub async fn send_now(&self, provider_name: &str, notification: Notification) {
        let Some(provider) = self.providers.get(provider_name) else { return };
        let outcomes = provider.send(std::slice::from_ref(&notification)).await;
        let outcome = outcomes.first().unwrap_or(&MISSING);
        self.metrics.deliveries.with_label_values(&[provider_name, outcome.label()]).inc();
        if matches!(outcome, Outcome::Delivered { .. }) {
            self.note_delivery(&notification.registration, now_ms());
        }
        let update = match outcome {
            Outcome::Delivered { receipt: Some(id) } => {
                let ticket = ReceiptTicket {
                    id: id.clone(),
                    registration: notification.registration.clone(),
                    token: notification.token.clone(),
                };
                receipts_later(provider_name, provider.as_ref(), vec![ticket], now_ms())
            }
            Outcome::Delivered { receipt: None } => None,
            Outcome::Gone { reason } => {
                tracing::info!(registration = %notification.registration, "device token is gone: {reason}");
                self.metrics.registrations.with_label_values(&["gone"]).inc();
                Some(Update::Gone { registration: notification.registration.clone(), token: notification.token.clone() })
            }
            Outcome::Retry { reason, .. } | Outcome::Failed { reason } => {
                tracing::info!(registration = %notification.registration, "TTL 0 message not delivered: {reason}");
                self.metrics.dropped.with_label_values(&["ttl0"]).inc();
                None
            }
        };
        if let Some(update) = update {
            if let Err(e) = self.store.apply(&[update]).await {
                tracing::error!("cannot record a TTL 0 outcome: {e}");
            }
        }
    }

    async fn check_receipts(&self) {
        let interval = self.poll_interval().max(Duration::from_millis(200));
        loop {
            let now = now_ms();
            let lease_until = now + i64::from(self.queue.lease_secs) * 1000;
            match self.store.claim_receipts(now, RECEIPT_BATCH, lease_until).await {
                Ok(due) if !due.is_empty() => {
                    let updates = self.check_batch(due).await;
                    if let Err(e) = self.store.apply(&updates).await {
                        tracing::warn!("cannot record receipt checks: {e}");
                    }
                    continue;
                }
                Ok(_) => {}
                Err(e) => tracing::warn!("cannot claim receipts: {e}"),
            }
            tokio::time::sleep(interval).await;
        }
    }

    async fn check_batch(&self, due: Vec<PendingReceipt>) -> Vec<Update> {
        let mut by_provider: HashMap<String, Vec<PendingReceipt>> = HashMap::new();
        for r in due {
            by_provider.entry(r.provider.clone()).or_default().push(r);
        }
        let mut updates = Vec::new();
        for (name, pending) in by_provider {
            let Some(provider) = self.providers.get(&name) else {
                updates.extend(pending.into_iter().map(|r| Update::ReceiptDone { id: r.id }));
                continue;
            };
            // One check for all the tickets due (the provider splits it as it must).
            let receipts: Vec<Receipt> = pending
                .iter()
                .flat_map(|r| &r.tickets)
                .map(|t| Receipt { id: t.id.clone(), registration: t.registration.clone() })
                .collect();
            let mut outcomes = provider.check_receipts(&receipts).await.into_iter().chain(std::iter::repeat(ReceiptOutcome::Pending));
            let now = now_ms();
            for batch in pending {
                let mut left = Vec::new();
                for ticket in batch.tickets {
                    match outcomes.next().unwrap_or(ReceiptOutcome::Pending) {
                        ReceiptOutcome::Done => {}
                        ReceiptOutcome::Gone { reason } => {
                            tracing::info!(registration = %ticket.registration, provider = %name, "device token is gone (receipt): {reason}");
                            self.metrics.registrations.with_label_values(&["gone"]).inc();
                            updates.push(Update::Gone { registration: ticket.registration, token: ticket.token });
                        }
                        ReceiptOutcome::Pending => left.push(ticket),
                    }
                }
                updates.push(if left.is_empty() || batch.checks + 1 >= RECEIPT_MAX_CHECKS {
                    Update::ReceiptDone { id: batch.id }
                } else {
                    Update::ReceiptLater { id: batch.id, check_at: now + RECEIPT_RECHECK_MS, checks: batch.checks + 1, tickets: left }
                });
            }
        }
        updates
    }

    /// Expires old messages, writes the latest deliveries and refreshes the
    /// queue gauges, once a second.
    async fn housekeeping(&self) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            self.flush_last_deliveries().await;
            let now = now_ms();
            match self.store.expire(now).await {
                Ok(n) if n > 0 => self.metrics.dropped.with_label_values(&["expired"]).inc_by(n),
                Ok(_) => {}
                Err(e) => tracing::warn!("cannot expire messages: {e}"),
            }
            if let Ok(stats) = self.store.queue_stats().await {
                self.metrics.queue_depth.set(stats.depth as i64);
                let age = stats.oldest_created_at.map_or(0, |t| (now - t).max(0) / 1000);
                self.metrics.queue_oldest_seconds.set(age);
            }
        }
    }
}

/// The receipts of one provider request, to check after the provider's
/// receipt delay (nothing when it has no receipts or none came back).
fn receipts_later(name: &str, provider: &dyn Provider, tickets: Vec<ReceiptTicket>, now: Millis) -> Option<Update> {
    let delay = provider.receipt_delay()?;
    (!tickets.is_empty()).then(|| {
        Update::AddReceipt(PendingReceipt {
            id: crate::keys::new_id(),
            provider: name.to_string(),
            check_at: now + delay.as_millis() as Millis,
            checks: 0,
            tickets,
        })
    })
}

/// The outcome used when a provider returned fewer outcomes than
/// notifications (a provider bug): retry rather than lose.
static MISSING: Outcome = Outcome::Retry { after: None, reason: String::new() };

/// The provider-facing notification for a claimed message at time `now`.
fn notification(c: &Claimed, now: Millis) -> Notification {
    let m = &c.message;
    Notification {
        message_id: m.id.clone(),
        registration: m.registration.clone(),
        token: c.token.clone(),
        instance: c.instance.clone(),
        account: c.account.clone(),
        urgency: m.urgency,
        ttl: Duration::from_millis((m.expires_at - now).max(1000) as u64),
        topic: m.topic.clone(),
        content: m.content.clone(),
    }
}

/// Exponential backoff with jitter: `base · 2^(attempts-1)`, capped, then a
/// random point in its upper half (so that retries of a failed batch spread
/// out instead of hitting the provider together).
pub fn backoff(queue: &push_relay_config::Queue, attempts: u32) -> Duration {
    let base = queue.retry_base_ms.max(1);
    let cap = queue.retry_max_secs.saturating_mul(1000).max(base);
    let exp = base.saturating_mul(1u64 << attempts.saturating_sub(1).min(40)).min(cap);
    let jittered = rand::thread_rng().gen_range(exp / 2..=exp);
    Duration::from_millis(jittered)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claimed(id: &str) -> Claimed {
        Claimed {
            message: crate::store::suite::message(id, "reg", None, 1_000),
            provider: "expo".into(),
            token: "ExponentPushToken[x]".into(),
            instance: "mastodon.social".into(),
            account: None,
            state: RegistrationState::Active,
        }
    }

    #[test]
    fn lane_holds_its_capacity_and_leaves_stale_messages_to_claims() {
        let lane = Lane::new(3);
        for (id, lease_until) in [("a", 10_000), ("b", 4_000), ("c", 10_000)] {
            let permit = lane.sender.clone().try_reserve_owned().expect("room");
            permit.send(Handed { claimed: claimed(id), lease_until });
        }
        assert!(lane.sender.clone().try_reserve_owned().is_err(), "full at its capacity");
        // "b" waited until less than the required lease was left: skipped.
        let taken: Vec<String> = lane.take(10, 5_000).into_iter().map(|c| c.message.id).collect();
        assert_eq!(taken, ["a", "c"]);
        assert!(lane.sender.clone().try_reserve_owned().is_ok(), "room again");
        assert!(lane.take(10, 0).is_empty());
    }

    #[test]
    fn lane_takes_at_most_a_batch_and_drains_the_rest() {
        let lane = Lane::new(10);
        for i in 0..5 {
            let permit = lane.sender.clone().try_reserve_owned().expect("room");
            permit.send(Handed { claimed: claimed(&format!("m{i}")), lease_until: 10_000 });
        }
        assert_eq!(lane.take(2, 0).len(), 2);
        assert_eq!(lane.drain(), ["m2", "m3", "m4"]);
        assert!(lane.take(10, 0).is_empty());
    }

    #[test]
    fn backoff_grows_and_caps() {
        let queue = push_relay_config::Queue { retry_base_ms: 1000, retry_max_secs: 10, ..Default::default() };
        for _ in 0..50 {
            let first = backoff(&queue, 1);
            assert!(first >= Duration::from_millis(500) && first <= Duration::from_millis(1000));
            let third = backoff(&queue, 3);
            assert!(third >= Duration::from_millis(2000) && third <= Duration::from_millis(4000));
            let late = backoff(&queue, 30);
            assert!(late >= Duration::from_millis(5000) && late <= Duration::from_millis(10_000));
            assert!(backoff(&queue, u32::MAX) <= Duration::from_secs(10));
        }
    }
}
