//! The embedded store: one SQLite file in WAL mode.
//!
//! SQLite has a single writer, so all writes go through one thread that
//! batches whatever is waiting into one transaction ("group commit"): under
//! load, hundreds of pushes share one `fsync`, and each still gets its own
//! result: should a job fail, the group is run again with every job inside
//! its own savepoint (savepoints cost too much to take every time). Reads run on a
//! small pool of separate connections, which WAL lets proceed while the
//! writer writes.
//!
//! The embedded store serves one process: a lock file next to the database
//! refuses a second one, and leases left by a killed process are released
//! at start.

use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Mutex};

use async_trait::async_trait;
use rusqlite::{params, Connection, OptionalExtension, Row};
use tokio::sync::oneshot;

use super::*;

/// Most jobs committed in one transaction.
const MAX_GROUP: usize = 512;

pub struct SqliteStore {
    writer: mpsc::Sender<Box<dyn WriteJob>>,
    readers: Option<Arc<ReaderPool>>,
    _lock: Option<std::fs::File>,
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `path`; `:memory:` keeps
    /// everything in memory, for tests.
    pub fn open(path: &Path, pool_size: usize) -> Result<SqliteStore> {
        let memory = path.as_os_str() == ":memory:";
        let lock = if memory { None } else { Some(lock_file(path)?) };
        let mut conn = open_connection(path)?;
        migrate(&mut conn)?;
        conn.execute_batch("UPDATE queue SET lease_until = 0; UPDATE receipts SET lease_until = 0;")
            .map_err(unavailable)?;
        let (tx, rx) = mpsc::channel::<Box<dyn WriteJob>>();
        std::thread::Builder::new()
            .name("sqlite-writer".into())
            .spawn(move || writer_loop(conn, rx))
            .map_err(|e| StoreError::Unavailable(format!("cannot start the SQLite writer: {e}")))?;
        let readers = (!memory).then(|| {
            Arc::new(ReaderPool { path: path.to_path_buf(), idle: Mutex::new(Vec::new()), max_idle: pool_size.max(1) })
        });
        Ok(SqliteStore { writer: tx, readers, _lock: lock })
    }

    /// Runs `f` in the writer's next transaction; resolves once committed.
    async fn write<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: Fn(&Connection) -> Result<T> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let job = Typed { work: f, result: None, reply: tx };
        self.writer
            .send(Box::new(job))
            .map_err(|_| StoreError::Unavailable("the SQLite writer has stopped".into()))?;
        rx.await.map_err(|_| StoreError::Unavailable("the SQLite writer has stopped".into()))?
    }

    /// After a private key was erased: old page images in the WAL still hold
    /// it, so checkpoint and truncate the WAL (best effort: readers in
    /// progress can postpone it to SQLite's next checkpoint).
    async fn flush_erasure(&self) {
        let Some(pool) = self.readers.clone() else { return };
        // The checkpoint may wait for readers: off the async workers.
        let done = tokio::task::spawn_blocking(move || {
            let conn = pool.take()?;
            let done = conn
                .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |row| row.get::<_, i64>(0))
                .map_err(unavailable);
            pool.put(conn);
            done
        })
        .await;
        if !matches!(done, Ok(Ok(0))) {
            tracing::debug!("WAL truncation after a key erasure postponed: {done:?}");
        }
    }

    /// Runs `f` on a reader connection (or, in memory, on the writer).
    ///
    /// Reads run right on the calling task: they are point lookups on
    /// cached pages that take microseconds, and WAL never makes them wait
    /// for the writer, so a hop to a blocking thread would cost more than
    /// the read itself.
    async fn read<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: Fn(&Connection) -> Result<T> + Send + 'static,
    {
        let Some(pool) = &self.readers else {
            return self.write(f).await;
        };
        let conn = pool.take()?;
        let result = f(&conn);
        pool.put(conn);
        result
    }
}

fn lock_file(path: &Path) -> Result<std::fs::File> {
    let mut lock_path = path.as_os_str().to_owned();
    lock_path.push(".lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| StoreError::Unavailable(format!("cannot open {}: {e}", Path::new(&lock_path).display())))?;
    file.try_lock().map_err(|_| {
        StoreError::Unavailable(format!(
            "{} is in use by another push-relay process (the embedded store serves one process; use PostgreSQL to run several)",
            path.display()
        ))
    })?;
    Ok(file)
}

fn open_connection(path: &Path) -> Result<Connection> {
    let conn = Connection::open(path)
        .map_err(|e| StoreError::Unavailable(format!("cannot open SQLite database {}: {e}", path.display())))?;
    // WAL lets readers run beside the writer; synchronous=FULL makes every
    // commit durable before the 201 is sent (group commit keeps it cheap);
    // secure_delete zeroes what rows leave behind, so erased keys do not
    // linger in free space; temp_store keeps the savepoints' sub-journal
    // (taken when a failed group is run again, see `writer_loop`) and other
    // temporary data in memory, not in files.
    conn.execute_batch(
        "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; PRAGMA secure_delete = ON; PRAGMA foreign_keys = OFF; \
         PRAGMA temp_store = MEMORY;",
    )
        .map_err(unavailable)?;
    conn.busy_timeout(std::time::Duration::from_secs(10)).map_err(unavailable)?;
    conn.set_prepared_statement_cache_capacity(64);
    Ok(conn)
}

fn migrate(conn: &mut Connection) -> Result<()> {
    let tx = conn.transaction().map_err(unavailable)?;
    tx.execute_batch("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        .map_err(unavailable)?;
    let current: i64 = tx
        .query_row("SELECT COALESCE(MAX(version), 0) FROM schema_version", [], |r| r.get(0))
        .map_err(unavailable)?;
    if current > migrations::SQLITE.len() as i64 {
        return Err(StoreError::Unavailable(format!(
            "the database has schema version {current}, newer than this build's {}; use a newer push-relay",
            migrations::SQLITE.len()
        )));
    }
    for (i, sql) in migrations::SQLITE.iter().enumerate().skip(current as usize) {
        tx.execute_batch(sql).map_err(unavailable)?;
        tx.execute("INSERT INTO schema_version (version) VALUES (?1)", params![i as i64 + 1])
            .map_err(unavailable)?;
    }
    tx.commit().map_err(unavailable)
}

/// Runs one statement through the connection's prepared-statement cache:
/// the same few statements run for every push, so each is parsed once.
fn exec<P: rusqlite::Params>(conn: &Connection, sql: &str, params: P) -> rusqlite::Result<usize> {
    conn.prepare_cached(sql)?.execute(params)
}

fn unavailable(e: rusqlite::Error) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

struct ReaderPool {
    path: PathBuf,
    idle: Mutex<Vec<Connection>>,
    max_idle: usize,
}

impl ReaderPool {
    fn take(&self) -> Result<Connection> {
        let idle = self.idle.lock().ok().and_then(|mut idle| idle.pop());
        match idle {
            Some(conn) => Ok(conn),
            None => open_connection(&self.path),
        }
    }

    fn put(&self, conn: Connection) {
        if let Ok(mut idle) = self.idle.lock() {
            if idle.len() < self.max_idle {
                idle.push(conn);
            }
        }
    }
}

/// A unit of work for the writer thread: `run` inside the group's
/// transaction (possibly twice, see [`writer_loop`]), then `finish` with the
/// outcome of the commit.
trait WriteJob: Send {
    /// Runs the job; `isolated` wraps it in a savepoint, so that its failure
    /// undoes only its own writes. Returns whether it succeeded.
    fn run(&mut self, conn: &Connection, isolated: bool) -> bool;
    fn finish(self: Box<Self>, commit: std::result::Result<(), String>);
}

struct Typed<T, F> {
    work: F,
    result: Option<Result<T>>,
    reply: oneshot::Sender<Result<T>>,
}

impl<T, F> WriteJob for Typed<T, F>
where
    T: Send + 'static,
    F: Fn(&Connection) -> Result<T> + Send + 'static,
{
    fn run(&mut self, conn: &Connection, isolated: bool) -> bool {
        if !isolated {
            let result = (self.work)(conn);
            let ok = result.is_ok();
            self.result = Some(result);
            return ok;
        }
        if let Err(e) = exec(conn, "SAVEPOINT job", []) {
            self.result = Some(Err(unavailable(e)));
            return false;
        }
        let result = (self.work)(conn);
        let end = if result.is_ok() {
            exec(conn, "RELEASE job", [])
        } else {
            exec(conn, "ROLLBACK TO job", []).and_then(|_| exec(conn, "RELEASE job", []))
        };
        self.result = Some(match end {
            Ok(_) => result,
            Err(e) => Err(unavailable(e)),
        });
        matches!(self.result, Some(Ok(_)))
    }

    fn finish(self: Box<Self>, commit: std::result::Result<(), String>) {
        let result = match (commit, self.result) {
            (Ok(()), Some(result)) => result,
            (Ok(()), None) => Err(StoreError::Unavailable("write job did not run".into())),
            (Err(e), _) => Err(StoreError::Unavailable(format!("commit failed: {e}"))),
        };
        let _ = self.reply.send(result);
    }
}

fn writer_loop(conn: Connection, rx: mpsc::Receiver<Box<dyn WriteJob>>) {
    while let Ok(first) = rx.recv() {
        let mut jobs = vec![first];
        while jobs.len() < MAX_GROUP {
            match rx.try_recv() {
                Ok(job) => jobs.push(job),
                Err(_) => break,
            }
        }
        // Optimistically without a savepoint per job (two statements and a
        // sub-journal each); should any job fail, the group is rolled back and
        // run again with one savepoint per job, so that the others' writes stay.
        let commit = match exec(&conn, "BEGIN IMMEDIATE", []) {
            Err(e) => Err(e.to_string()),
            Ok(_) => {
                let mut all_ok = true;
                for job in jobs.iter_mut() {
                    all_ok &= job.run(&conn, false);
                }
                if !all_ok {
                    let again = exec(&conn, "ROLLBACK", []).and_then(|_| exec(&conn, "BEGIN IMMEDIATE", []));
                    if let Err(e) = again {
                        for job in jobs {
                            job.finish(Err(e.to_string()));
                        }
                        continue;
                    }
                    for job in jobs.iter_mut() {
                        job.run(&conn, true);
                    }
                }
                exec(&conn, "COMMIT", []).map(|_| ()).map_err(|e| {
                    let _ = exec(&conn, "ROLLBACK", []);
                    e.to_string()
                })
            }
        };
        for job in jobs {
            job.finish(commit.clone());
        }
    }
}

const REGISTRATION_COLUMNS: &str = "id, secret_hash, provider, token, instance, account, p256dh, private_key, auth, \
     server_key, allow_decrypt, state, created_at, last_seen_at, last_delivery_at, delivery_failures, unsubscribe_url, sealed_keys";

fn registration_from_row(row: &Row<'_>) -> rusqlite::Result<(Registration, String)> {
    let state: String = row.get(11)?;
    Ok((
        Registration {
            id: row.get(0)?,
            secret_hash: row.get(1)?,
            provider: row.get(2)?,
            token: row.get(3)?,
            instance: row.get(4)?,
            account: row.get(5)?,
            p256dh: row.get(6)?,
            private_key: row.get(7)?,
            auth: row.get(8)?,
            server_key: row.get(9)?,
            allow_decrypt: row.get(10)?,
            state: RegistrationState::Pending,
            created_at: row.get(12)?,
            last_seen_at: row.get(13)?,
            last_delivery_at: row.get(14)?,
            delivery_failures: row.get(15)?,
            unsubscribe_url: row.get(16)?,
            sealed_keys: row.get(17)?,
        },
        state,
    ))
}

/// Removes everything queued or pending for a registration.
fn purge(conn: &Connection, registration: &str) -> Result<()> {
    for sql in [
        "DELETE FROM queue WHERE registration = ?1",
        "DELETE FROM stored_bodies WHERE registration = ?1",
    ] {
        exec(conn, sql, params![registration]).map_err(unavailable)?;
    }
    Ok(())
}

const MESSAGE_COLUMNS: &str = "q.id, q.registration, q.created_at, q.expires_at, q.urgency, q.topic, q.content_kind, \
     q.encoding, q.body, q.salt, q.dh, q.fields, q.attempts, q.next_attempt_at, q.provider";

fn message_from_row(row: &Row<'_>) -> Result<QueuedMessage> {
    let get = |e: rusqlite::Error| StoreError::Corrupt(e.to_string());
    let kind: String = row.get(6).map_err(get)?;
    let urgency: String = row.get(4).map_err(get)?;
    Ok(QueuedMessage {
        id: row.get(0).map_err(get)?,
        registration: row.get(1).map_err(get)?,
        created_at: row.get(2).map_err(get)?,
        expires_at: row.get(3).map_err(get)?,
        urgency: parse_urgency(&urgency)?,
        topic: row.get(5).map_err(get)?,
        content: content_from_columns(
            &kind,
            row.get(7).map_err(get)?,
            row.get(8).map_err(get)?,
            row.get(9).map_err(get)?,
            row.get(10).map_err(get)?,
            row.get(11).map_err(get)?,
        )?,
        attempts: row.get(12).map_err(get)?,
        next_attempt_at: row.get(13).map_err(get)?,
        provider: row.get(14).map_err(get)?,
    })
}

fn apply_one(conn: &Connection, update: &Update) -> Result<()> {
    let result = match update {
        Update::Delivered { message } => exec(conn, "DELETE FROM queue WHERE id = ?1", params![message]),
        Update::LastDelivery { registration, at } => exec(
            conn,
            "UPDATE registrations SET last_delivery_at = ?2 WHERE id = ?1 AND COALESCE(last_delivery_at, 0) < ?2",
            params![registration, at],
        ),
        Update::Retry { message, attempts, next_attempt_at } => exec(conn, 
            "UPDATE queue SET attempts = ?2, next_attempt_at = ?3, lease_until = 0 WHERE id = ?1",
            params![message, attempts, next_attempt_at],
        ),
        Update::Drop { message, registration, failed } => {
            exec(conn, "DELETE FROM queue WHERE id = ?1", params![message]).and_then(|_| {
                if *failed {
                    exec(conn, 
                        "UPDATE registrations SET delivery_failures = delivery_failures + 1 WHERE id = ?1",
                        params![registration],
                    )
                } else {
                    Ok(0)
                }
            })
        }
        Update::Gone { registration, token } => {
            let changed = exec(conn, 
                    "UPDATE registrations SET state = 'gone', delivery_failures = delivery_failures + 1 \
                     WHERE id = ?1 AND token = ?2 AND state <> 'deleted'",
                    params![registration, token],
                )
                .map_err(unavailable)?;
            return if changed > 0 { purge(conn, registration) } else { Ok(()) };
        }
        Update::AddReceipt(r) => exec(conn, 
            "INSERT OR REPLACE INTO receipts (id, provider, check_at, checks, lease_until, tickets) \
             VALUES (?1, ?2, ?3, ?4, 0, ?5)",
            params![r.id, r.provider, r.check_at, r.checks, tickets_json(&r.tickets)],
        ),
        Update::ReceiptDone { id } => exec(conn, "DELETE FROM receipts WHERE id = ?1", params![id]),
        Update::ReceiptLater { id, check_at, checks, tickets } => exec(conn, 
            "UPDATE receipts SET check_at = ?2, checks = ?3, tickets = ?4, lease_until = 0 WHERE id = ?1",
            params![id, check_at, checks, tickets_json(tickets)],
        ),
    };
    result.map(|_| ()).map_err(unavailable)
}

#[async_trait]
impl Store for SqliteStore {
    async fn ping(&self) -> Result<()> {
        self.read(|conn| conn.query_row("SELECT 1", [], |_| Ok(())).map_err(unavailable)).await
    }

    async fn insert_registration(&self, r: &Registration) -> Result<()> {
        let r = r.clone();
        self.write(move |conn| {
            exec(conn, 
                &format!("INSERT INTO registrations ({REGISTRATION_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18)"),
                params![
                    r.id, r.secret_hash, r.provider, r.token, r.instance, r.account, r.p256dh, r.private_key,
                    r.auth, r.server_key, r.allow_decrypt, r.state.as_str(), r.created_at, r.last_seen_at,
                    r.last_delivery_at, r.delivery_failures, r.unsubscribe_url, r.sealed_keys
                ],
            )
            .map(|_| ())
            .map_err(unavailable)
        })
        .await
    }

    async fn registration(&self, id: &str) -> Result<Option<Registration>> {
        let id = id.to_string();
        self.read(move |conn| {
            let mut stmt = conn
                .prepare_cached(&format!("SELECT {REGISTRATION_COLUMNS} FROM registrations WHERE id = ?1"))
                .map_err(unavailable)?;
            let row = stmt.query_row(params![id], registration_from_row).optional().map_err(unavailable)?;
            row.map(|(mut r, state)| {
                r.state = RegistrationState::parse(&state)?;
                Ok(r)
            })
            .transpose()
        })
        .await
    }

    async fn update_registration(&self, r: &Registration) -> Result<()> {
        let r = r.clone();
        let erased = self.write(move |conn| {
            let had_keys: bool = conn
                .query_row(
                    "SELECT private_key IS NOT NULL OR auth IS NOT NULL FROM registrations WHERE id = ?1",
                    params![r.id],
                    |row| row.get(0),
                )
                .optional()
                .map_err(unavailable)?
                .unwrap_or(false);
            exec(conn, 
                "UPDATE registrations SET token = ?2, private_key = ?3, auth = ?4, server_key = ?5, \
                 allow_decrypt = ?6, state = ?7, last_seen_at = ?8, unsubscribe_url = ?9, sealed_keys = ?10 WHERE id = ?1",
                params![r.id, r.token, r.private_key, r.auth, r.server_key, r.allow_decrypt, r.state.as_str(), r.last_seen_at, r.unsubscribe_url, r.sealed_keys],
            )
            .map_err(unavailable)?;
            if matches!(r.state, RegistrationState::Deleted | RegistrationState::Gone) {
                purge(conn, &r.id)?;
            }
            Ok(had_keys && r.private_key.is_none() && r.auth.is_none())
        })
        .await?;
        if erased {
            self.flush_erasure().await;
        }
        Ok(())
    }

    async fn touch_registration(&self, id: &str, at: Millis) -> Result<()> {
        let id = id.to_string();
        self.write(move |conn| {
            exec(conn, "UPDATE registrations SET last_seen_at = ?2 WHERE id = ?1", params![id, at])
                .map(|_| ())
                .map_err(unavailable)
        })
        .await
    }

    async fn set_unsubscribe_url(&self, id: &str, url: &str) -> Result<()> {
        let (id, url) = (id.to_string(), url.to_string());
        self.write(move |conn| {
            exec(conn, "UPDATE registrations SET unsubscribe_url = ?2 WHERE id = ?1", params![id, url])
                .map(|_| ())
                .map_err(unavailable)
        })
        .await
    }

    async fn enqueue(&self, m: &QueuedMessage, body: Option<&StoredBody>, lease_until: Millis) -> Result<()> {
        let m = m.clone();
        let body = body.cloned();
        self.write(move |conn| {
            if let Some(topic) = &m.topic {
                // RFC 8030 §5.4: a newer message replaces a queued one with
                // the same topic; one being delivered right now is left be.
                exec(conn, 
                    "DELETE FROM queue WHERE registration = ?1 AND topic = ?2 AND lease_until <= ?3",
                    params![m.registration, topic, m.created_at],
                )
                .map_err(unavailable)?;
            }
            let (kind, encoding, body_bytes, salt, dh, fields) = content_columns(&m.content);
            exec(conn, 
                "INSERT INTO queue (id, registration, created_at, expires_at, urgency, topic, content_kind, encoding, \
                 body, salt, dh, fields, attempts, next_attempt_at, lease_until, provider) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?16, ?15)",
                params![
                    m.id, m.registration, m.created_at, m.expires_at, m.urgency.as_str(), m.topic, kind, encoding,
                    body_bytes, salt, dh, fields, m.attempts, m.next_attempt_at, m.provider, lease_until
                ],
            )
            .map_err(unavailable)?;
            if let Some(b) = &body {
                exec(conn, 
                    "INSERT INTO stored_bodies (id, registration, encoding, body, salt, dh, expires_at) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                    params![b.message_id, b.registration, b.encoding.as_str(), b.body, b.salt, b.dh, b.expires_at],
                )
                .map_err(unavailable)?;
            }
            Ok(())
        })
        .await
    }

    async fn claim(&self, provider: &str, now: Millis, limit: usize, lease_until: Millis) -> Result<Vec<Claimed>> {
        let provider = provider.to_string();
        self.write(move |conn| {
            let mut stmt = conn
                .prepare_cached(&format!(
                    "SELECT {MESSAGE_COLUMNS}, r.token, r.instance, r.account, r.state \
                     FROM queue q LEFT JOIN registrations r ON r.id = q.registration \
                     WHERE q.provider = ?3 AND q.next_attempt_at <= ?1 AND q.lease_until <= ?1 \
                     ORDER BY q.next_attempt_at LIMIT ?2"
                ))
                .map_err(unavailable)?;
            let mut rows = stmt.query(params![now, limit as i64, provider]).map_err(unavailable)?;
            let mut claimed = Vec::new();
            while let Some(row) = rows.next().map_err(unavailable)? {
                let message = message_from_row(row)?;
                let get = |e: rusqlite::Error| StoreError::Corrupt(e.to_string());
                let state: Option<String> = row.get(18).map_err(get)?;
                claimed.push(Claimed {
                    provider: message.provider.clone(),
                    message,
                    token: row.get::<_, Option<String>>(15).map_err(get)?.unwrap_or_default(),
                    instance: row.get::<_, Option<String>>(16).map_err(get)?.unwrap_or_default(),
                    account: row.get(17).map_err(get)?,
                    // A message whose registration row vanished is treated
                    // as deleted: dispatch drops it.
                    state: match state {
                        Some(s) => RegistrationState::parse(&s)?,
                        None => RegistrationState::Deleted,
                    },
                });
            }
            let mut lease = conn
                .prepare_cached("UPDATE queue SET lease_until = ?2 WHERE id = ?1")
                .map_err(unavailable)?;
            for c in &claimed {
                lease.execute(params![c.message.id, lease_until]).map_err(unavailable)?;
            }
            Ok(claimed)
        })
        .await
    }

    async fn extend_lease(&self, ids: &[String], lease_until: Millis) -> Result<()> {
        let ids = ids.to_vec();
        self.write(move |conn| {
            let mut stmt = conn
                .prepare_cached("UPDATE queue SET lease_until = ?2 WHERE id = ?1")
                .map_err(unavailable)?;
            for id in &ids {
                stmt.execute(params![id, lease_until]).map_err(unavailable)?;
            }
            Ok(())
        })
        .await
    }

    async fn apply(&self, updates: &[Update]) -> Result<()> {
        let updates = updates.to_vec();
        self.write(move |conn| updates.iter().try_for_each(|u| apply_one(conn, u))).await
    }

    async fn take_body(&self, registration: &str, message_id: &str, now: Millis) -> Result<Option<StoredBody>> {
        let (registration, message_id) = (registration.to_string(), message_id.to_string());
        self.write(move |conn| {
            let row = conn
                .query_row(
                    "DELETE FROM stored_bodies WHERE id = ?1 AND registration = ?2 \
                     RETURNING id, registration, encoding, body, salt, dh, expires_at",
                    params![message_id, registration],
                    |row| {
                        Ok((
                            row.get::<_, String>(0)?,
                            row.get::<_, String>(1)?,
                            row.get::<_, String>(2)?,
                            row.get::<_, Vec<u8>>(3)?,
                            row.get::<_, Option<Vec<u8>>>(4)?,
                            row.get::<_, Option<Vec<u8>>>(5)?,
                            row.get::<_, i64>(6)?,
                        ))
                    },
                )
                .optional()
                .map_err(unavailable)?;
            let Some((message_id, registration, encoding, body, salt, dh, expires_at)) = row else {
                return Ok(None);
            };
            if expires_at <= now {
                return Ok(None);
            }
            Ok(Some(StoredBody {
                message_id,
                registration,
                encoding: parse_encoding(Some(&encoding))?,
                body,
                salt,
                dh,
                expires_at,
            }))
        })
        .await
    }

    async fn expire(&self, now: Millis) -> Result<u64> {
        self.write(move |conn| {
            let expired = exec(conn, "DELETE FROM queue WHERE expires_at <= ?1 AND lease_until <= ?1", params![now])
                .map_err(unavailable)?;
            exec(conn, "DELETE FROM stored_bodies WHERE expires_at <= ?1", params![now])
                .map_err(unavailable)?;
            Ok(expired as u64)
        })
        .await
    }

    async fn claim_receipts(&self, now: Millis, limit: usize, lease_until: Millis) -> Result<Vec<PendingReceipt>> {
        self.write(move |conn| {
            let mut stmt = conn
                .prepare_cached(
                    "UPDATE receipts SET lease_until = ?3 WHERE id IN \
                     (SELECT id FROM receipts WHERE check_at <= ?1 AND lease_until <= ?1 ORDER BY check_at LIMIT ?2) \
                     RETURNING id, provider, check_at, checks, tickets",
                )
                .map_err(unavailable)?;
            let rows = stmt
                .query_map(params![now, limit as i64, lease_until], |row| {
                    Ok((
                        row.get::<_, String>(0)?,
                        row.get::<_, String>(1)?,
                        row.get::<_, Millis>(2)?,
                        row.get::<_, u32>(3)?,
                        row.get::<_, String>(4)?,
                    ))
                })
                .map_err(unavailable)?;
            let rows = rows.collect::<rusqlite::Result<Vec<_>>>().map_err(unavailable)?;
            rows.into_iter()
                .map(|(id, provider, check_at, checks, tickets)| {
                    Ok(PendingReceipt { id, provider, check_at, checks, tickets: tickets_from_json(&tickets)? })
                })
                .collect()
        })
        .await
    }

    async fn queue_stats(&self) -> Result<QueueStats> {
        self.read(|conn| {
            conn.query_row("SELECT COUNT(*), MIN(created_at) FROM queue", [], |row| {
                Ok(QueueStats { depth: row.get::<_, i64>(0)? as u64, oldest_created_at: row.get(1)? })
            })
            .map_err(unavailable)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn suite_in_memory() {
        let store = SqliteStore::open(Path::new(":memory:"), 2).expect("open");
        suite::run(&store).await;
    }

    #[tokio::test]
    async fn suite_on_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SqliteStore::open(&dir.path().join("relay.db"), 2).expect("open");
        suite::run(&store).await;
    }

    #[tokio::test]
    async fn one_process_per_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("relay.db");
        let _first = SqliteStore::open(&path, 1).expect("open");
        let second = SqliteStore::open(&path, 1);
        assert!(matches!(second, Err(StoreError::Unavailable(m)) if m.contains("another push-relay process")));
    }

    #[tokio::test]
    async fn reopen_keeps_messages_and_releases_leases() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("relay.db");
        {
            let store = SqliteStore::open(&path, 1).expect("open");
            suite::seed_claimed(&store).await;
        }
        let store = SqliteStore::open(&path, 1).expect("reopen");
        suite::check_reclaimable(&store).await;
    }
}
