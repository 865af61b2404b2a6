//! The PostgreSQL store, for deployments that want a server database or
//! several relay processes sharing one queue.
//!
//! Claims use `FOR UPDATE SKIP LOCKED`, so concurrent claimers in any
//! number of processes take disjoint batches without waiting on each other;
//! the lease they set keeps a message from being claimed again until it was
//! delivered, rescheduled, or its claimer died and the lease ran out.

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;
use deadpool_postgres::{GenericClient, Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio::sync::{mpsc, oneshot};
use tokio_postgres::{NoTls, Row};

use super::*;

/// Advisory lock key that serialises migrations of processes starting together.
const MIGRATION_LOCK: i64 = 0x7075_7368_7265_6c61; // "pushrela"

pub struct PostgresStore {
    pool: Pool,
    enqueue: mpsc::Sender<EnqueueJob>,
    apply: mpsc::Sender<ApplyJob>,
    lookups: mpsc::Sender<LookupJob>,
}

impl PostgresStore {
    pub async fn open(url: &str, pool_size: usize) -> Result<PostgresStore> {
        let mut config: tokio_postgres::Config = url
            .parse()
            .map_err(|e| StoreError::Unavailable(format!("invalid PostgreSQL URL: {e}")))?;
        // Every statement here is prepared once per connection and run
        // thousands of times with arrays of ids, for which PostgreSQL's
        // default keeps re-planning each execution (a custom plan looks
        // cheaper for an array it cannot size); the plans are index lookups
        // either way. Needs PostgreSQL 12 or newer.
        let options = match config.get_options() {
            Some(given) => format!("{given} -c plan_cache_mode=force_generic_plan"),
            None => "-c plan_cache_mode=force_generic_plan".to_owned(),
        };
        config.options(&options);
        let manager = Manager::from_config(config, NoTls, ManagerConfig { recycling_method: RecyclingMethod::Fast });
        let pool = Pool::builder(manager)
            .max_size(pool_size.max(1))
            .build()
            .map_err(|e| StoreError::Unavailable(format!("cannot build the PostgreSQL pool: {e}")))?;
        let (enqueue, jobs) = mpsc::channel(MAX_GROUP * COMMITTERS);
        let (apply, apply_jobs) = mpsc::channel(64);
        let (lookups, lookup_jobs) = mpsc::channel(MAX_LOOKUPS * LOOKERS);
        let store = PostgresStore { pool, enqueue, apply, lookups };
        store.migrate().await?;
        let jobs = Arc::new(tokio::sync::Mutex::new(jobs));
        for _ in 0..COMMITTERS {
            tokio::spawn(commit_loop(store.pool.clone(), jobs.clone()));
        }
        let apply_jobs = Arc::new(tokio::sync::Mutex::new(apply_jobs));
        for _ in 0..APPLIERS {
            tokio::spawn(commit_loop(store.pool.clone(), apply_jobs.clone()));
        }
        let lookup_jobs = Arc::new(tokio::sync::Mutex::new(lookup_jobs));
        for _ in 0..LOOKERS {
            tokio::spawn(lookup_loop(store.pool.clone(), lookup_jobs.clone()));
        }
        Ok(store)
    }

    async fn client(&self) -> Result<deadpool_postgres::Object> {
        connection(&self.pool).await
    }

    async fn migrate(&self) -> Result<()> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(pg)?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK]).await.map_err(pg)?;
        tx.batch_execute("CREATE TABLE IF NOT EXISTS schema_version (version BIGINT NOT NULL)")
            .await
            .map_err(pg)?;
        let current: i64 = tx
            .query_one("SELECT COALESCE(MAX(version), 0) FROM schema_version", &[])
            .await
            .map_err(pg)?
            .get(0);
        if current > migrations::POSTGRES.len() as i64 {
            return Err(StoreError::Unavailable(format!(
                "the database has schema version {current}, newer than this build's {}; use a newer push-relay",
                migrations::POSTGRES.len()
            )));
        }
        for (i, sql) in migrations::POSTGRES.iter().enumerate().skip(current as usize) {
            tx.batch_execute(sql).await.map_err(pg)?;
            tx.execute("INSERT INTO schema_version (version) VALUES ($1)", &[&(i as i64 + 1)])
                .await
                .map_err(pg)?;
        }
        tx.commit().await.map_err(pg)
    }
}

/// A pooled connection.
async fn connection(pool: &Pool) -> Result<deadpool_postgres::Object> {
    pool.get().await.map_err(|e| StoreError::Unavailable(format!("PostgreSQL: {e}")))
}

/// Concurrent enqueues waiting to be committed together.
struct EnqueueJob {
    message: QueuedMessage,
    body: Option<StoredBody>,
    lease_until: Millis,
    reply: oneshot::Sender<Result<()>>,
}

/// Concurrent registration lookups waiting to be read together.
struct LookupJob {
    id: String,
    reply: oneshot::Sender<Result<Option<Registration>>>,
}

/// Most registrations read in one statement.
const MAX_LOOKUPS: usize = 256;
/// Lookup loops: one statement in flight each.
const LOOKERS: usize = 4;

/// Takes the next job and whatever others are already waiting (up to
/// `max`); `None` once every sender is gone. The lock is held only while
/// gathering, so another loop gathers the next group while this one works.
async fn next_group<J>(jobs: &tokio::sync::Mutex<mpsc::Receiver<J>>, max: usize) -> Option<Vec<J>> {
    let mut jobs = jobs.lock().await;
    let mut group = vec![jobs.recv().await?];
    while group.len() < max {
        match jobs.try_recv() {
            Ok(job) => group.push(job),
            Err(_) => break,
        }
    }
    Some(group)
}

/// Every push reads its registration first. Read one by one, those reads
/// were most of the PostgreSQL server's work per push (a statement and a
/// round trip each); pushes arriving together are now read with one
/// `id = ANY($1)` statement. An idle relay still reads at once: a lookup
/// waits only while another of the same loop is in flight.
async fn lookup_loop(pool: Pool, jobs: Arc<tokio::sync::Mutex<mpsc::Receiver<LookupJob>>>) {
    while let Some(group) = next_group(&jobs, MAX_LOOKUPS).await {
        match lookup_group(&pool, &group).await {
            Ok(mut found) => {
                let mut jobs = group.into_iter();
                while let Some(job) = jobs.next() {
                    // The same id may be asked for twice in one group: only
                    // its last asker takes the row, the others a copy.
                    let asked_again = jobs.as_slice().iter().any(|later| later.id == job.id);
                    let registration =
                        if asked_again { found.get(&job.id).cloned() } else { found.remove(&job.id) };
                    let _ = job.reply.send(Ok(registration));
                }
            }
            Err(e) => {
                for job in group {
                    let _ = job.reply.send(Err(StoreError::Unavailable(e.to_string())));
                }
            }
        }
    }
}

async fn lookup_group(pool: &Pool, group: &[LookupJob]) -> Result<HashMap<String, Registration>> {
    let client = connection(pool).await?;
    let stmt = client
        .prepare_cached(&format!("SELECT {REGISTRATION_COLUMNS} FROM registrations WHERE id = ANY($1)"))
        .await
        .map_err(pg)?;
    let ids: Vec<&str> = group.iter().map(|job| job.id.as_str()).collect();
    let rows = client.query(&stmt, &[&ids]).await.map_err(pg)?;
    rows.iter()
        .map(|row| registration_from_row(row).map(|r| (r.id.clone(), r)))
        .collect()
}

/// Most messages committed in one transaction.
const MAX_GROUP: usize = 512;
/// Commit loops: while one waits for its commit, another gathers the next group.
const COMMITTERS: usize = 4;
/// Loops applying delivery outcomes, the same way.
const APPLIERS: usize = 2;

/// Group commit: each loop takes whatever enqueues are waiting and commits
/// them in one transaction with one multi-row insert, so a burst of pushes
/// costs a few commits instead of one each.
async fn commit_loop<J: Committed>(pool: Pool, jobs: Arc<tokio::sync::Mutex<mpsc::Receiver<J>>>) {
    while let Some(group) = next_group(&jobs, J::MAX_GROUP).await {
        match J::commit(&pool, &group).await {
            Ok(()) => {
                for job in group {
                    job.reply(Ok(()));
                }
            }
            // One bad job must not fail the others: try each alone.
            Err(_) if group.len() > 1 => {
                for job in group {
                    let result = J::commit(&pool, std::slice::from_ref(&job)).await;
                    job.reply(result);
                }
            }
            Err(e) => {
                for job in group {
                    job.reply(Err(StoreError::Unavailable(e.to_string())));
                }
            }
        }
    }
}

/// A write that is committed together with whatever others of its kind are waiting.
trait Committed: Sized + Send + 'static {
    /// Most jobs in one transaction.
    const MAX_GROUP: usize;
    fn commit(pool: &Pool, group: &[Self]) -> impl std::future::Future<Output = Result<()>> + Send;
    fn reply(self, result: Result<()>);
}

impl Committed for EnqueueJob {
    const MAX_GROUP: usize = MAX_GROUP;
    fn commit(pool: &Pool, group: &[Self]) -> impl std::future::Future<Output = Result<()>> + Send {
        insert_group(pool, group)
    }
    fn reply(self, result: Result<()>) {
        let _ = self.reply.send(result);
    }
}

/// Delivery outcomes of concurrent workers, applied together.
struct ApplyJob {
    updates: Vec<Update>,
    reply: oneshot::Sender<Result<()>>,
}

impl Committed for ApplyJob {
    const MAX_GROUP: usize = 64;
    fn commit(pool: &Pool, group: &[Self]) -> impl std::future::Future<Output = Result<()>> + Send {
        apply_group(pool, group)
    }
    fn reply(self, result: Result<()>) {
        let _ = self.reply.send(result);
    }
}

/// Applies the outcomes of several delivered batches in one transaction.
/// The frequent updates go as one statement each for the whole group
/// (deleting the messages and remembering their receipts share one); the
/// rare ones one by one. Workers finishing together share a commit, as
/// enqueues do.
async fn apply_group(pool: &Pool, group: &[ApplyJob]) -> Result<()> {
    let mut removed: Vec<&str> = Vec::new();
    let mut delivered: HashMap<&str, Millis> = HashMap::new();
    let mut failures: HashMap<&str, i64> = HashMap::new();
    let mut receipts: Vec<&PendingReceipt> = Vec::new();
    let mut receipts_done: Vec<&str> = Vec::new();
    let mut others: Vec<&Update> = Vec::new();
    for update in group.iter().flat_map(|job| &job.updates) {
        match update {
            Update::Delivered { message } => removed.push(message),
            Update::LastDelivery { registration, at } => {
                let last = delivered.entry(registration).or_insert(*at);
                *last = (*last).max(*at);
            }
            Update::Drop { message, registration, failed } => {
                removed.push(message);
                if *failed {
                    *failures.entry(registration).or_default() += 1;
                }
            }
            Update::AddReceipt(r) => receipts.push(r),
            Update::ReceiptDone { id } => receipts_done.push(id),
            other => others.push(other),
        }
    }
    let mut client = connection(pool).await?;
    if delivered.is_empty() && failures.is_empty() && receipts_done.is_empty() && others.is_empty() {
        // The usual group (delivered messages and their receipts): one
        // statement, atomic by itself, so no BEGIN and COMMIT round trips.
        return remove_and_record(&client, &removed, &receipts).await;
    }
    let tx = client.transaction().await.map_err(pg)?;
    remove_and_record(&tx, &removed, &receipts).await?;
    if !delivered.is_empty() {
        let (ids, ats): (Vec<&str>, Vec<Millis>) = delivered.into_iter().unzip();
        exec(
            &tx,
            "UPDATE registrations r SET last_delivery_at = d.at \
             FROM unnest($1::text[], $2::bigint[]) AS d(id, at) \
             WHERE r.id = d.id AND COALESCE(r.last_delivery_at, 0) < d.at",
            &[&ids, &ats],
        )
        .await?;
    }
    if !failures.is_empty() {
        let (ids, counts): (Vec<&str>, Vec<i64>) = failures.into_iter().unzip();
        exec(
            &tx,
            "UPDATE registrations r SET delivery_failures = r.delivery_failures + f.n \
             FROM unnest($1::text[], $2::bigint[]) AS f(id, n) WHERE r.id = f.id",
            &[&ids, &counts],
        )
        .await?;
    }
    if !receipts_done.is_empty() {
        exec(&tx, "DELETE FROM receipts WHERE id = ANY($1)", &[&receipts_done]).await?;
    }
    for update in others {
        apply_one(&tx, update).await?;
    }
    tx.commit().await.map_err(pg)
}

/// Removes delivered (or dropped) messages and remembers the receipts of
/// their provider requests, in one statement (a data-modifying CTE).
async fn remove_and_record(client: &impl GenericClient, removed: &[&str], receipts: &[&PendingReceipt]) -> Result<()> {
    if removed.is_empty() && receipts.is_empty() {
        return Ok(());
    }
    let ids: Vec<&str> = receipts.iter().map(|r| r.id.as_str()).collect();
    let providers: Vec<&str> = receipts.iter().map(|r| r.provider.as_str()).collect();
    let check_at: Vec<Millis> = receipts.iter().map(|r| r.check_at).collect();
    let checks: Vec<i32> = receipts.iter().map(|r| i32::try_from(r.checks).unwrap_or(i32::MAX)).collect();
    let tickets: Vec<String> = receipts.iter().map(|r| tickets_json(&r.tickets)).collect();
    exec(
        client,
        "WITH removed AS (DELETE FROM queue WHERE id = ANY($1)) \
         INSERT INTO receipts (id, provider, check_at, checks, lease_until, tickets) \
         SELECT id, provider, check_at, checks, 0, tickets \
         FROM unnest($2::text[], $3::text[], $4::bigint[], $5::int[], $6::text[]) \
             AS r(id, provider, check_at, checks, tickets) \
         ON CONFLICT (id) DO UPDATE SET check_at = EXCLUDED.check_at",
        &[&removed, &ids, &providers, &check_at, &checks, &tickets],
    )
    .await
    .map(|_| ())
}

async fn insert_group(pool: &Pool, group: &[EnqueueJob]) -> Result<()> {
    // Topic replacement (RFC 8030 §5.4): a queued, unclaimed message with the
    // same registration and topic goes; within the group the last one wins
    // (over those not already handed to a worker).
    let mut topics: HashMap<(&str, &str), usize> = HashMap::new();
    for (i, job) in group.iter().enumerate() {
        if let Some(topic) = &job.message.topic {
            topics.insert((&job.message.registration, topic), i);
        }
    }
    let kept: Vec<&EnqueueJob> = group
        .iter()
        .enumerate()
        .filter(|(i, job)| match &job.message.topic {
            Some(topic) if job.lease_until == 0 => {
                topics.get(&(job.message.registration.as_str(), topic.as_str())) == Some(i)
            }
            _ => true,
        })
        .map(|(_, job)| job)
        .collect();
    let leases: Vec<Millis> = kept.iter().map(|job| job.lease_until).collect();
    let kept: Vec<&QueuedMessage> = kept.iter().map(|job| &job.message).collect();
    let mut client = connection(pool).await?;
    if topics.is_empty() && group.iter().all(|job| job.body.is_none()) {
        // The usual group: one multi-row insert, atomic by itself, so no
        // BEGIN and COMMIT round trips.
        return insert_messages(&client, &kept, &leases).await;
    }
    let tx = client.transaction().await.map_err(pg)?;
    if !topics.is_empty() {
        let (registrations, topic_names): (Vec<&str>, Vec<&str>) = topics.keys().copied().unzip();
        let now = group.iter().map(|j| j.message.created_at).max().unwrap_or(0);
        exec(
            &tx,
            "DELETE FROM queue q USING unnest($1::text[], $2::text[]) AS t(registration, topic) \
             WHERE q.registration = t.registration AND q.topic = t.topic AND q.lease_until <= $3",
            &[&registrations, &topic_names, &now],
        )
        .await?;
    }
    insert_messages(&tx, &kept, &leases).await?;
    for b in group.iter().filter_map(|job| job.body.as_ref()) {
        exec(
            &tx,
            "INSERT INTO stored_bodies (id, registration, encoding, body, salt, dh, expires_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
            &[&b.message_id, &b.registration, &b.encoding.as_str(), &b.body, &b.salt, &b.dh, &b.expires_at],
        )
        .await?;
    }
    tx.commit().await.map_err(pg)
}

/// Inserts queued messages with one multi-row statement.
async fn insert_messages(client: &impl GenericClient, kept: &[&QueuedMessage], leases: &[Millis]) -> Result<()> {
    let columns: Vec<ContentColumns> = kept.iter().map(|m| content_columns(&m.content)).collect();
    let ids: Vec<&str> = kept.iter().map(|m| m.id.as_str()).collect();
    let registrations: Vec<&str> = kept.iter().map(|m| m.registration.as_str()).collect();
    let providers: Vec<&str> = kept.iter().map(|m| m.provider.as_str()).collect();
    let created: Vec<Millis> = kept.iter().map(|m| m.created_at).collect();
    let expires: Vec<Millis> = kept.iter().map(|m| m.expires_at).collect();
    let urgencies: Vec<&str> = kept.iter().map(|m| m.urgency.as_str()).collect();
    let topic_col: Vec<Option<&str>> = kept.iter().map(|m| m.topic.as_deref()).collect();
    let kinds: Vec<&str> = columns.iter().map(|c| c.0).collect();
    let encodings: Vec<Option<&str>> = columns.iter().map(|c| c.1).collect();
    let bodies: Vec<Option<&[u8]>> = columns.iter().map(|c| c.2.as_deref()).collect();
    let salts: Vec<Option<&[u8]>> = columns.iter().map(|c| c.3.as_deref()).collect();
    let dhs: Vec<Option<&[u8]>> = columns.iter().map(|c| c.4.as_deref()).collect();
    let fields: Vec<Option<&str>> = columns.iter().map(|c| c.5.as_deref()).collect();
    let attempts: Vec<i32> = kept.iter().map(|m| i32::try_from(m.attempts).unwrap_or(i32::MAX)).collect();
    let next: Vec<Millis> = kept.iter().map(|m| m.next_attempt_at).collect();
    exec(
        client,
        "INSERT INTO queue (id, registration, provider, created_at, expires_at, urgency, topic, content_kind, \
         encoding, body, salt, dh, fields, attempts, next_attempt_at, lease_until) \
         SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[], $5::bigint[], $6::text[], \
             $7::text[], $8::text[], $9::text[], $10::bytea[], $11::bytea[], $12::bytea[], $13::text[], \
             $14::int[], $15::bigint[], $16::bigint[])",
        &[
            &ids, &registrations, &providers, &created, &expires, &urgencies, &topic_col, &kinds, &encodings,
            &bodies, &salts, &dhs, &fields, &attempts, &next, &leases,
        ],
    )
    .await
    .map(|_| ())
}

/// Runs `sql` as a statement prepared once per connection: tokio-postgres
/// otherwise prepares a text query anew on every call, which costs the
/// server a parse and plan and the relay a round trip.
async fn exec(client: &impl GenericClient, sql: &str, params: &[&(dyn tokio_postgres::types::ToSql + Sync)]) -> Result<u64> {
    let stmt = client.prepare_cached(sql).await.map_err(pg)?;
    client.execute(&stmt, params).await.map_err(pg)
}

fn pg(e: tokio_postgres::Error) -> StoreError {
    StoreError::Unavailable(format!("PostgreSQL: {e}"))
}

fn corrupt(e: tokio_postgres::Error) -> StoreError {
    StoreError::Corrupt(e.to_string())
}

const REGISTRATION_COLUMNS: &str = "id, secret_hash, provider, token, instance, account, p256dh, private_key, auth, \
     server_key, allow_decrypt, state, created_at, last_seen_at, last_delivery_at, delivery_failures, unsubscribe_url, sealed_keys";

fn registration_from_row(row: &Row) -> Result<Registration> {
    let state: String = row.try_get(11).map_err(corrupt)?;
    Ok(Registration {
        id: row.try_get(0).map_err(corrupt)?,
        secret_hash: row.try_get(1).map_err(corrupt)?,
        provider: row.try_get(2).map_err(corrupt)?,
        token: row.try_get(3).map_err(corrupt)?,
        instance: row.try_get(4).map_err(corrupt)?,
        account: row.try_get(5).map_err(corrupt)?,
        p256dh: row.try_get(6).map_err(corrupt)?,
        private_key: row.try_get(7).map_err(corrupt)?,
        auth: row.try_get(8).map_err(corrupt)?,
        server_key: row.try_get(9).map_err(corrupt)?,
        allow_decrypt: row.try_get(10).map_err(corrupt)?,
        state: RegistrationState::parse(&state)?,
        created_at: row.try_get(12).map_err(corrupt)?,
        last_seen_at: row.try_get(13).map_err(corrupt)?,
        last_delivery_at: row.try_get(14).map_err(corrupt)?,
        delivery_failures: row.try_get(15).map_err(corrupt)?,
        unsubscribe_url: row.try_get(16).map_err(corrupt)?,
        sealed_keys: row.try_get(17).map_err(corrupt)?,
    })
}

const MESSAGE_COLUMNS: &str = "id, registration, created_at, expires_at, urgency, topic, content_kind, \
     encoding, body, salt, dh, fields, attempts, next_attempt_at, provider";

fn message_from_row(row: &Row) -> Result<QueuedMessage> {
    let kind: String = row.try_get(6).map_err(corrupt)?;
    let urgency: String = row.try_get(4).map_err(corrupt)?;
    let attempts: i32 = row.try_get(12).map_err(corrupt)?;
    Ok(QueuedMessage {
        id: row.try_get(0).map_err(corrupt)?,
        registration: row.try_get(1).map_err(corrupt)?,
        created_at: row.try_get(2).map_err(corrupt)?,
        expires_at: row.try_get(3).map_err(corrupt)?,
        urgency: parse_urgency(&urgency)?,
        topic: row.try_get(5).map_err(corrupt)?,
        content: content_from_columns(
            &kind,
            row.try_get(7).map_err(corrupt)?,
            row.try_get(8).map_err(corrupt)?,
            row.try_get(9).map_err(corrupt)?,
            row.try_get(10).map_err(corrupt)?,
            row.try_get(11).map_err(corrupt)?,
        )?,
        attempts: attempts.max(0) as u32,
        next_attempt_at: row.try_get(13).map_err(corrupt)?,
        provider: row.try_get(14).map_err(corrupt)?,
    })
}

async fn purge(client: &impl GenericClient, registration: &str) -> Result<()> {
    for sql in [
        "DELETE FROM queue WHERE registration = $1",
        "DELETE FROM stored_bodies WHERE registration = $1",
    ] {
        client.execute(sql, &[&registration]).await.map_err(pg)?;
    }
    Ok(())
}

/// The rare updates, one statement each (the frequent ones go in bulk, see `apply`).
async fn apply_one(client: &impl GenericClient, update: &Update) -> Result<()> {
    match update {
        Update::Retry { message, attempts, next_attempt_at } => {
            let attempts = i32::try_from(*attempts).unwrap_or(i32::MAX);
            client
                .execute(
                    "UPDATE queue SET attempts = $2, next_attempt_at = $3, lease_until = 0 WHERE id = $1",
                    &[message, &attempts, next_attempt_at],
                )
                .await
                .map_err(pg)?;
        }
        Update::Gone { registration, token } => {
            let changed = client
                .execute(
                    "UPDATE registrations SET state = 'gone', delivery_failures = delivery_failures + 1 \
                     WHERE id = $1 AND token = $2 AND state <> 'deleted'",
                    &[registration, token],
                )
                .await
                .map_err(pg)?;
            if changed > 0 {
                purge(client, registration).await?;
            }
        }
        Update::ReceiptLater { id, check_at, checks, tickets } => {
            let checks = i32::try_from(*checks).unwrap_or(i32::MAX);
            client
                .execute(
                    "UPDATE receipts SET check_at = $2, checks = $3, tickets = $4, lease_until = 0 WHERE id = $1",
                    &[id, check_at, &checks, &tickets_json(tickets)],
                )
                .await
                .map_err(pg)?;
        }
        // Applied in bulk by `apply`, one statement per kind for the whole batch.
        Update::Delivered { .. }
        | Update::LastDelivery { .. }
        | Update::Drop { .. }
        | Update::AddReceipt(_)
        | Update::ReceiptDone { .. } => {}
    }
    Ok(())
}

#[async_trait]
impl Store for PostgresStore {
    async fn ping(&self) -> Result<()> {
        self.client().await?.simple_query("SELECT 1").await.map(|_| ()).map_err(pg)
    }

    async fn insert_registration(&self, r: &Registration) -> Result<()> {
        let client = self.client().await?;
        client
            .execute(
                &format!("INSERT INTO registrations ({REGISTRATION_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18)"),
                &[
                    &r.id, &r.secret_hash, &r.provider, &r.token, &r.instance, &r.account, &r.p256dh, &r.private_key,
                    &r.auth, &r.server_key, &r.allow_decrypt, &r.state.as_str(), &r.created_at, &r.last_seen_at,
                    &r.last_delivery_at, &r.delivery_failures, &r.unsubscribe_url, &r.sealed_keys,
                ],
            )
            .await
            .map(|_| ())
            .map_err(pg)
    }

    async fn registration(&self, id: &str) -> Result<Option<Registration>> {
        let (reply, answer) = oneshot::channel();
        let stopped = || StoreError::Unavailable("the PostgreSQL reader has stopped".into());
        self.lookups.send(LookupJob { id: id.to_owned(), reply }).await.map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }

    async fn update_registration(&self, r: &Registration) -> Result<()> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(pg)?;
        tx.execute(
            "UPDATE registrations SET token = $2, private_key = $3, auth = $4, server_key = $5, \
             allow_decrypt = $6, state = $7, last_seen_at = $8, unsubscribe_url = $9, sealed_keys = $10 WHERE id = $1",
            &[&r.id, &r.token, &r.private_key, &r.auth, &r.server_key, &r.allow_decrypt, &r.state.as_str(), &r.last_seen_at, &r.unsubscribe_url, &r.sealed_keys],
        )
        .await
        .map_err(pg)?;
        if matches!(r.state, RegistrationState::Deleted | RegistrationState::Gone) {
            purge(&tx, &r.id).await?;
        }
        tx.commit().await.map_err(pg)
    }

    async fn touch_registration(&self, id: &str, at: Millis) -> Result<()> {
        let client = self.client().await?;
        client
            .execute("UPDATE registrations SET last_seen_at = $2 WHERE id = $1", &[&id, &at])
            .await
            .map(|_| ())
            .map_err(pg)
    }

    async fn set_unsubscribe_url(&self, id: &str, url: &str) -> Result<()> {
        let client = self.client().await?;
        client
            .execute("UPDATE registrations SET unsubscribe_url = $2 WHERE id = $1", &[&id, &url])
            .await
            .map(|_| ())
            .map_err(pg)
    }

    async fn enqueue(&self, m: &QueuedMessage, body: Option<&StoredBody>, lease_until: Millis) -> Result<()> {
        let (reply, answer) = oneshot::channel();
        let job = EnqueueJob { message: m.clone(), body: body.cloned(), lease_until, reply };
        let stopped = || StoreError::Unavailable("the PostgreSQL committer has stopped".into());
        self.enqueue.send(job).await.map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }

    async fn claim(&self, provider: &str, now: Millis, limit: usize, lease_until: Millis) -> Result<Vec<Claimed>> {
        let client = self.client().await?;
        let stmt = client
            .prepare_cached(&format!(
                "WITH due AS ( \
                     SELECT id FROM queue WHERE provider = $4 AND next_attempt_at <= $1 AND lease_until <= $1 \
                     ORDER BY next_attempt_at LIMIT $2 FOR UPDATE SKIP LOCKED), \
                 leased AS ( \
                     UPDATE queue q SET lease_until = $3 FROM due WHERE q.id = due.id \
                     RETURNING q.{}) \
                 SELECT leased.*, r.token, r.instance, r.account, r.state \
                 FROM leased LEFT JOIN registrations r ON r.id = leased.registration",
                MESSAGE_COLUMNS.replace(", ", ", q.")
            ))
            .await
            .map_err(pg)?;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = client.query(&stmt, &[&now, &limit, &lease_until, &provider]).await.map_err(pg)?;
        rows.iter()
            .map(|row| {
                let state: Option<String> = row.try_get(18).map_err(corrupt)?;
                let message = message_from_row(row)?;
                Ok(Claimed {
                    provider: message.provider.clone(),
                    message,
                    token: row.try_get::<_, Option<String>>(15).map_err(corrupt)?.unwrap_or_default(),
                    instance: row.try_get::<_, Option<String>>(16).map_err(corrupt)?.unwrap_or_default(),
                    account: row.try_get(17).map_err(corrupt)?,
                    state: match state {
                        Some(s) => RegistrationState::parse(&s)?,
                        None => RegistrationState::Deleted,
                    },
                })
            })
            .collect()
    }

    async fn extend_lease(&self, ids: &[String], lease_until: Millis) -> Result<()> {
        let client = self.client().await?;
        exec(&client, "UPDATE queue SET lease_until = $2 WHERE id = ANY($1)", &[&ids, &lease_until]).await.map(|_| ())
    }

    async fn apply(&self, updates: &[Update]) -> Result<()> {
        let (reply, answer) = oneshot::channel();
        let stopped = || StoreError::Unavailable("the PostgreSQL committer has stopped".into());
        self.apply.send(ApplyJob { updates: updates.to_vec(), reply }).await.map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }

    async fn take_body(&self, registration: &str, message_id: &str, now: Millis) -> Result<Option<StoredBody>> {
        let client = self.client().await?;
        let row = client
            .query_opt(
                "DELETE FROM stored_bodies WHERE id = $1 AND registration = $2 \
                 RETURNING id, registration, encoding, body, salt, dh, expires_at",
                &[&message_id, &registration],
            )
            .await
            .map_err(pg)?;
        let Some(row) = row else { return Ok(None) };
        let expires_at: i64 = row.try_get(6).map_err(corrupt)?;
        if expires_at <= now {
            return Ok(None);
        }
        let encoding: String = row.try_get(2).map_err(corrupt)?;
        Ok(Some(StoredBody {
            message_id: row.try_get(0).map_err(corrupt)?,
            registration: row.try_get(1).map_err(corrupt)?,
            encoding: parse_encoding(Some(&encoding))?,
            body: row.try_get(3).map_err(corrupt)?,
            salt: row.try_get(4).map_err(corrupt)?,
            dh: row.try_get(5).map_err(corrupt)?,
            expires_at,
        }))
    }

    async fn expire(&self, now: Millis) -> Result<u64> {
        let client = self.client().await?;
        let expired = client
            .execute("DELETE FROM queue WHERE expires_at <= $1 AND lease_until <= $1", &[&now])
            .await
            .map_err(pg)?;
        client.execute("DELETE FROM stored_bodies WHERE expires_at <= $1", &[&now]).await.map_err(pg)?;
        Ok(expired)
    }

    async fn claim_receipts(&self, now: Millis, limit: usize, lease_until: Millis) -> Result<Vec<PendingReceipt>> {
        let client = self.client().await?;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = client
            .query(
                "WITH due AS ( \
                     SELECT id FROM receipts WHERE check_at <= $1 AND lease_until <= $1 \
                     ORDER BY check_at LIMIT $2 FOR UPDATE SKIP LOCKED) \
                 UPDATE receipts r SET lease_until = $3 FROM due WHERE r.id = due.id \
                 RETURNING r.id, r.provider, r.check_at, r.checks, r.tickets",
                &[&now, &limit, &lease_until],
            )
            .await
            .map_err(pg)?;
        rows.iter()
            .map(|row| {
                let checks: i32 = row.try_get(3).map_err(corrupt)?;
                let tickets: String = row.try_get(4).map_err(corrupt)?;
                Ok(PendingReceipt {
                    id: row.try_get(0).map_err(corrupt)?,
                    provider: row.try_get(1).map_err(corrupt)?,
                    check_at: row.try_get(2).map_err(corrupt)?,
                    tickets: tickets_from_json(&tickets)?,
                    checks: checks.max(0) as u32,
                })
            })
            .collect()
    }

    async fn queue_stats(&self) -> Result<QueueStats> {
        let client = self.client().await?;
        let row = client.query_one("SELECT COUNT(*), MIN(created_at) FROM queue", &[]).await.map_err(pg)?;
        let depth: i64 = row.try_get(0).map_err(corrupt)?;
        Ok(QueueStats { depth: depth.max(0) as u64, oldest_created_at: row.try_get(1).map_err(corrupt)? })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh database on the PostgreSQL server the test script provides
    /// (`PUSH_RELAY_TEST_PG`, default `postgres://postgres@127.0.0.1:5432/test`).
    /// Tests fail, never skip, when it is down.
    async fn fresh() -> (PostgresStore, String) {
        let admin = std::env::var("PUSH_RELAY_TEST_PG")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_string());
        let (client, conn) = tokio_postgres::connect(&admin, NoTls).await.unwrap_or_else(|e| {
            panic!("PostgreSQL at {admin} is needed for these tests ({e}); start it with: pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start")
        });
        tokio::spawn(conn);
        let name = format!("pr_unit_{:016x}", rand::random::<u64>());
        client.batch_execute(&format!("CREATE DATABASE {name}")).await.expect("create database");
        let mut config: tokio_postgres::Config = admin.parse().expect("admin url");
        config.dbname(&name);
        let url = format!(
            "postgres://{}@{}:{}/{name}",
            config.get_user().unwrap_or("postgres"),
            match config.get_hosts().first() {
                Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
                _ => "127.0.0.1".to_string(),
            },
            config.get_ports().first().copied().unwrap_or(5432)
        );
        (PostgresStore::open(&url, 4).await.expect("open store"), url)
    }

    #[tokio::test]
    async fn suite() {
        let (store, _) = fresh().await;
        super::suite::run(&store).await;
    }

    #[tokio::test]
    async fn concurrent_claimers_take_disjoint_batches() {
        let (store, url) = fresh().await;
        super::suite::seed_many(&store, 200).await;
        let other = PostgresStore::open(&url, 4).await.expect("second process");
        let (a, b) = tokio::join!(super::suite::claim_all(&store), super::suite::claim_all(&other));
        let mut all: Vec<String> = a.into_iter().chain(b).collect();
        assert_eq!(all.len(), 200, "every message claimed");
        all.sort();
        all.dedup();
        assert_eq!(all.len(), 200, "no message claimed twice");
    }

    #[tokio::test]
    async fn migrations_are_idempotent() {
        let (_store, url) = fresh().await;
        let again = PostgresStore::open(&url, 1).await.expect("reopen");
        let client = again.client().await.expect("client");
        let version: i64 = client.query_one("SELECT MAX(version) FROM schema_version", &[]).await.expect("v").get(0);
        assert_eq!(version, SCHEMA_VERSION);
    }
}
