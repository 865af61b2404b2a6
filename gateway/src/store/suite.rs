//! One test suite for every store implementation: the SQLite store runs it
//! in memory and on a file, the PostgreSQL store on a real server.

use push_relay_providers::{Content, Encoding, Urgency};

use super::*;

pub fn registration(id: &str, state: RegistrationState) -> Registration {
    Registration {
        id: id.to_string(),
        secret_hash: vec![7; 32],
        provider: "expo".into(),
        token: format!("ExponentPushToken[{id}]"),
        instance: "mastodon.social".into(),
        account: Some("@alice@mastodon.social".into()),
        p256dh: vec![4; 65],
        private_key: Some(vec![1; 32]),
        auth: Some(vec![2; 16]),
        server_key: Some(vec![4; 65]),
        allow_decrypt: false,
        state,
        created_at: 1_000,
        last_seen_at: 1_000,
        last_delivery_at: None,
        delivery_failures: 0,
        unsubscribe_url: None,
        sealed_keys: Some(vec![8; 76]),
    }
}

pub fn message(id: &str, registration: &str, topic: Option<&str>, now: Millis) -> QueuedMessage {
    QueuedMessage {
        id: id.to_string(),
        registration: registration.to_string(),
        provider: "expo".into(),
        created_at: now,
        expires_at: now + 60_000,
        urgency: Urgency::High,
        topic: topic.map(str::to_string),
        content: Content::Opaque {
            encoding: Encoding::Aesgcm,
            body: vec![9; 100],
            salt: Some(vec![3; 16]),
            dh: Some(vec![4; 65]),
        },
        attempts: 0,
        next_attempt_at: now,
    }
}

fn ids(claimed: &[Claimed]) -> Vec<String> {
    let mut ids: Vec<String> = claimed.iter().map(|c| c.message.id.clone()).collect();
    ids.sort();
    ids
}

pub async fn run(store: &dyn Store) {
    store.ping().await.expect("ping");
    registrations(store).await;
    queue(store).await;
    one_failure_spares_the_others(store).await;
    handed_off(store).await;
    topics(store).await;
    bodies(store).await;
    gone_and_deleted(store).await;
    receipts(store).await;
    expiry(store).await;
}

async fn registrations(store: &dyn Store) {
    assert!(store.registration("nope").await.expect("read").is_none());
    let mut r = registration("reg-a", RegistrationState::Pending);
    store.insert_registration(&r).await.expect("insert");
    assert_eq!(store.registration("reg-a").await.expect("read"), Some(r.clone()));
    assert!(store.insert_registration(&r).await.is_err(), "duplicate id refused");

    r.state = RegistrationState::Active;
    r.private_key = None;
    r.auth = None;
    r.server_key = Some(vec![4; 65]);
    r.token = "ExponentPushToken[rotated]".into();
    r.last_seen_at = 5_000;
    r.unsubscribe_url = Some("https://mastodon.social/unsubscribe/1".into());
    r.sealed_keys = None;
    store.update_registration(&r).await.expect("update");
    let back = store.registration("reg-a").await.expect("read").expect("exists");
    assert_eq!(back, r, "erased keys stay erased, new token kept");

    store.touch_registration("reg-a", 9_000).await.expect("touch");
    store.set_unsubscribe_url("reg-a", "https://mastodon.social/unsubscribe/2").await.expect("set url");
    let back = store.registration("reg-a").await.expect("read").expect("exists");
    assert_eq!(back.last_seen_at, 9_000);
    assert_eq!(back.unsubscribe_url.as_deref(), Some("https://mastodon.social/unsubscribe/2"));
    assert_eq!(back.token, r.token, "nothing else touched");
}

async fn queue(store: &dyn Store) {
    store.insert_registration(&registration("reg-q", RegistrationState::Active)).await.expect("insert");
    let now = 100_000;
    for i in 0..5 {
        store.enqueue(&message(&format!("q{i}"), "reg-q", None, now + i), None, 0).await.expect("enqueue");
    }
    // Not yet due.
    store.enqueue(&message("q-later", "reg-q", None, now + 50_000), None, 0).await.expect("enqueue");
    assert_eq!(store.queue_stats().await.expect("stats").depth, 6);

    assert!(store.claim("other", now + 10, 10, now + 10_000).await.expect("claim").is_empty(), "per provider");
    let first = store.claim("expo", now + 10, 3, now + 10_000).await.expect("claim");
    assert_eq!(ids(&first), ["q0", "q1", "q2"]);
    let c = first.iter().find(|c| c.message.id == "q0").expect("q0 claimed");
    assert_eq!(c.token, "ExponentPushToken[reg-q]");
    assert_eq!(c.provider, "expo");
    assert_eq!(c.instance, "mastodon.social");
    assert_eq!(c.state, RegistrationState::Active);
    assert_eq!(c.message, message("q0", "reg-q", None, now));

    // Leased messages are not claimed again; the rest are.
    let second = store.claim("expo", now + 10, 10, now + 10_000).await.expect("claim");
    assert_eq!(ids(&second), ["q3", "q4"]);
    assert!(store.claim("expo", now + 10, 10, now + 10_000).await.expect("claim").is_empty());

    // Deliver one, retry one, drop one.
    store
        .apply(&[
            Update::Delivered { message: "q0".into() },
            Update::LastDelivery { registration: "reg-q".into(), at: now + 20 },
            Update::Retry { message: "q1".into(), attempts: 1, next_attempt_at: now + 1_000 },
            Update::Drop { message: "q2".into(), registration: "reg-q".into(), failed: true },
        ])
        .await
        .expect("apply");
    let r = store.registration("reg-q").await.expect("read").expect("exists");
    assert_eq!(r.last_delivery_at, Some(now + 20));
    assert_eq!(r.delivery_failures, 1);
    // The latest delivery wins, whatever order notes of it arrive in.
    store.apply(&[Update::LastDelivery { registration: "reg-q".into(), at: now + 10 }]).await.expect("apply");
    let r = store.registration("reg-q").await.expect("read").expect("exists");
    assert_eq!(r.last_delivery_at, Some(now + 20));
    assert!(store.claim("expo", now + 500, 10, now + 10_000).await.expect("claim").is_empty(), "retry not due yet");
    let retried = store.claim("expo", now + 1_000, 10, now + 20_000).await.expect("claim");
    assert_eq!(ids(&retried), ["q1"]);
    assert_eq!(retried[0].message.attempts, 1);

    // A renewed lease keeps q3, q4 reserved past the first lease's end...
    store.extend_lease(&["q3".to_string(), "q4".to_string()], now + 10_500).await.expect("extend");
    assert!(store.claim("expo", now + 10_001, 10, now + 30_000).await.expect("claim").is_empty(), "renewed");
    // ...and a lease that ran out (its claimer died) makes them claimable again.
    let reclaimed = store.claim("expo", now + 10_501, 10, now + 30_000).await.expect("claim");
    assert_eq!(ids(&reclaimed), ["q3", "q4"]);
    store
        .apply(&[
            Update::Delivered { message: "q1".into() },
            Update::Delivered { message: "q3".into() },
            Update::Delivered { message: "q4".into() },
        ])
        .await
        .expect("apply");
    let stats = store.queue_stats().await.expect("stats");
    assert_eq!(stats.depth, 1);
    assert_eq!(stats.oldest_created_at, Some(now + 50_000));
    let later = store.claim("expo", now + 50_000, 10, now + 60_000).await.expect("claim");
    assert_eq!(ids(&later), ["q-later"]);
    store
        .apply(&[Update::Drop { message: "q-later".into(), registration: "reg-q".into(), failed: false }])
        .await
        .expect("apply");
    assert_eq!(store.queue_stats().await.expect("stats").depth, 0);
}

/// Writes sent together (SQLite commits them as one group) succeed or
/// fail each on its own: a refused write does not undo the others.
async fn one_failure_spares_the_others(store: &dyn Store) {
    let existing = registration("reg-f", RegistrationState::Active);
    store.insert_registration(&existing).await.expect("insert");
    let now = 120_000;
    let (a, b) = (message("f1", "reg-f", None, now), message("f2", "reg-f", None, now));
    let fresh = registration("reg-f2", RegistrationState::Active);
    let (ra, dup, rb, rf) = tokio::join!(
        store.enqueue(&a, None, 0),
        store.insert_registration(&existing),
        store.enqueue(&b, None, 0),
        store.insert_registration(&fresh),
    );
    assert!(dup.is_err(), "a duplicate registration id is refused");
    ra.expect("first enqueue");
    rb.expect("second enqueue");
    rf.expect("other registration");
    assert_eq!(store.registration("reg-f2").await.expect("read"), Some(fresh));
    let claimed = store.claim("expo", now, 10, now + 1_000).await.expect("claim");
    assert_eq!(ids(&claimed), ["f1", "f2"]);
    let done: Vec<Update> = ["f1", "f2"].iter().map(|id| Update::Delivered { message: id.to_string() }).collect();
    store.apply(&done).await.expect("apply");
}

/// A message queued already leased (handed straight to a worker) is
/// invisible to claims, topic replacement and expiry until its lease ends,
/// and claimable like any other afterwards (its worker died).
async fn handed_off(store: &dyn Store) {
    store.insert_registration(&registration("reg-h", RegistrationState::Active)).await.expect("insert");
    let now = 150_000;
    let leased = QueuedMessage { expires_at: now + 1_000, ..message("h1", "reg-h", Some("status"), now) };
    store.enqueue(&leased, None, now + 5_000).await.expect("enqueue leased");
    store.enqueue(&message("h2", "reg-h", None, now), None, 0).await.expect("enqueue");
    let claimed = store.claim("expo", now + 1, 10, now + 5_000).await.expect("claim");
    assert_eq!(ids(&claimed), ["h2"], "the leased message is not claimed");
    // A newer message with its topic does not replace one being delivered.
    store.enqueue(&message("h3", "reg-h", Some("status"), now + 2), None, now + 5_000).await.expect("enqueue");
    assert_eq!(store.expire(now + 2_000).await.expect("expire"), 0, "a leased message is not expired under its worker");
    assert_eq!(store.queue_stats().await.expect("stats").depth, 3);
    // Its worker never reported back: after the lease, any claimer gets it.
    let reclaimed = store.claim("expo", now + 5_001, 10, now + 20_000).await.expect("claim");
    assert_eq!(ids(&reclaimed), ["h1", "h2", "h3"]);
    let h1 = reclaimed.iter().find(|c| c.message.id == "h1").expect("h1");
    assert_eq!(h1.message, leased);
    assert_eq!(h1.token, "ExponentPushToken[reg-h]");
    let updates: Vec<Update> = ["h1", "h2", "h3"]
        .iter()
        .map(|id| Update::Delivered { message: id.to_string() })
        .collect();
    store.apply(&updates).await.expect("apply");
    assert_eq!(store.queue_stats().await.expect("stats").depth, 0);
}

async fn topics(store: &dyn Store) {
    store.insert_registration(&registration("reg-t", RegistrationState::Active)).await.expect("insert");
    let now = 200_000;
    store.enqueue(&message("t1", "reg-t", Some("timeline"), now), None, 0).await.expect("enqueue");
    store.enqueue(&message("t2", "reg-t", Some("other"), now), None, 0).await.expect("enqueue");
    store.enqueue(&message("t3", "reg-t", Some("timeline"), now + 1), None, 0).await.expect("enqueue");
    let claimed = store.claim("expo", now + 1, 10, now + 5_000).await.expect("claim");
    assert_eq!(ids(&claimed), ["t2", "t3"], "t3 replaced t1");
    // A claimed (in flight) message is not replaced.
    store.enqueue(&message("t4", "reg-t", Some("other"), now + 2), None, 0).await.expect("enqueue");
    let updates: Vec<Update> = ["t2", "t3"]
        .iter()
        .map(|id| Update::Delivered { message: id.to_string() })
        .collect();
    store.apply(&updates).await.expect("apply");
    let claimed = store.claim("expo", now + 2, 10, now + 5_000).await.expect("claim");
    assert_eq!(ids(&claimed), ["t4"]);
    store.apply(&[Update::Delivered { message: "t4".into() }]).await.expect("apply");

    // Concurrent pushes with one topic (one group commit): exactly one stays.
    let (a, b, c) = (
        message("t5", "reg-t", Some("burst"), now + 3),
        message("t6", "reg-t", Some("burst"), now + 3),
        message("t7", "reg-t", None, now + 3),
    );
    let (ra, rb, rc) = tokio::join!(store.enqueue(&a, None, 0), store.enqueue(&b, None, 0), store.enqueue(&c, None, 0));
    (ra.expect("enqueue"), rb.expect("enqueue"), rc.expect("enqueue"));
    let claimed = ids(&store.claim("expo", now + 3, 10, now + 5_000).await.expect("claim"));
    assert_eq!(claimed.len(), 2, "{claimed:?}");
    assert!(claimed.contains(&"t7".to_string()));
    let updates: Vec<Update> = claimed
        .iter()
        .map(|id| Update::Delivered { message: id.clone() })
        .collect();
    store.apply(&updates).await.expect("apply");
}

async fn bodies(store: &dyn Store) {
    store.insert_registration(&registration("reg-b", RegistrationState::Active)).await.expect("insert");
    let now = 300_000;
    let mut m = message("b1", "reg-b", None, now);
    m.content = Content::Fetch;
    let body = StoredBody {
        message_id: "b1".into(),
        registration: "reg-b".into(),
        encoding: Encoding::Aes128gcm,
        body: vec![5; 3000],
        salt: None,
        dh: None,
        expires_at: now + 60_000,
    };
    store.enqueue(&m, Some(&body), 0).await.expect("enqueue");
    let claimed = store.claim("expo", now, 10, now + 1_000).await.expect("claim");
    assert_eq!(claimed.len(), 1);
    assert_eq!(claimed[0].message.content, Content::Fetch);
    store.apply(&[Update::Delivered { message: "b1".into() }]).await.expect("apply");
    assert!(store.take_body("other-reg", "b1", now).await.expect("take").is_none(), "only its registration");
    assert_eq!(store.take_body("reg-b", "b1", now).await.expect("take"), Some(body.clone()));
    assert!(store.take_body("reg-b", "b1", now).await.expect("take").is_none(), "kept until fetched");

    // Expired bodies are not served.
    let mut late = body.clone();
    late.message_id = "b2".into();
    let mut m2 = m.clone();
    m2.id = "b2".into();
    store.enqueue(&m2, Some(&late), 0).await.expect("enqueue");
    assert!(store.take_body("reg-b", "b2", now + 60_000).await.expect("take").is_none());
    store.apply(&[Update::Drop { message: "b2".into(), registration: "reg-b".into(), failed: false }]).await.expect("apply");
}

async fn gone_and_deleted(store: &dyn Store) {
    let now = 400_000;
    store.insert_registration(&registration("reg-g", RegistrationState::Active)).await.expect("insert");
    store.enqueue(&message("g1", "reg-g", None, now), None, 0).await.expect("enqueue");
    store.enqueue(&message("g2", "reg-g", None, now), None, 0).await.expect("enqueue");
    // A dead *old* token (rotated since) leaves the registration alone.
    store
        .apply(&[Update::Gone { registration: "reg-g".into(), token: "ExponentPushToken[old]".into() }])
        .await
        .expect("apply");
    let r = store.registration("reg-g").await.expect("read").expect("exists");
    assert_eq!(r.state, RegistrationState::Active);
    assert_eq!(ids(&store.claim("expo", now, 10, now).await.expect("claim")), ["g1", "g2"], "queue kept");
    store.apply(&[Update::Gone { registration: "reg-g".into(), token: "ExponentPushToken[reg-g]".into() }]).await.expect("apply");
    let r = store.registration("reg-g").await.expect("read").expect("exists");
    assert_eq!(r.state, RegistrationState::Gone);
    assert!(store.claim("expo", now, 10, now + 1_000).await.expect("claim").is_empty(), "queue purged");

    let mut d = registration("reg-d", RegistrationState::Active);
    store.insert_registration(&d).await.expect("insert");
    store.enqueue(&message("d1", "reg-d", None, now), None, 0).await.expect("enqueue");
    d.state = RegistrationState::Deleted;
    store.update_registration(&d).await.expect("delete");
    assert_eq!(store.registration("reg-d").await.expect("read").expect("tombstone").state, RegistrationState::Deleted);
    assert!(store.claim("expo", now, 10, now + 1_000).await.expect("claim").is_empty(), "queue purged");
    // Gone never overrides deleted.
    store.apply(&[Update::Gone { registration: "reg-d".into(), token: String::new() }]).await.expect("apply");
    assert_eq!(store.registration("reg-d").await.expect("read").expect("tombstone").state, RegistrationState::Deleted);
}

async fn receipts(store: &dyn Store) {
    let now = 500_000;
    let ticket = |id: &str| ReceiptTicket {
        id: id.into(),
        registration: "reg-q".into(),
        token: "ExponentPushToken[reg-q]".into(),
    };
    let batch = |id: &str, at, tickets: Vec<ReceiptTicket>| PendingReceipt {
        id: id.into(),
        provider: "expo".into(),
        check_at: at,
        checks: 0,
        tickets,
    };
    let first = batch("b1", now, vec![ticket("t1"), ticket("t2")]);
    let second = batch("b2", now + 10_000, vec![ticket("t3")]);
    store
        .apply(&[Update::AddReceipt(first.clone()), Update::AddReceipt(second.clone())])
        .await
        .expect("apply");
    let due = store.claim_receipts(now, 10, now + 1_000).await.expect("claim");
    assert_eq!(due, vec![first]);
    assert!(store.claim_receipts(now, 10, now + 1_000).await.expect("claim").is_empty(), "leased");
    // t1 was answered; t2 is checked again later.
    store
        .apply(&[Update::ReceiptLater { id: "b1".into(), check_at: now + 20_000, checks: 1, tickets: vec![ticket("t2")] }])
        .await
        .expect("apply");
    let due = store.claim_receipts(now + 20_000, 10, now + 21_000).await.expect("claim");
    let mut got: Vec<(String, u32, Vec<String>)> =
        due.iter().map(|r| (r.id.clone(), r.checks, r.tickets.iter().map(|t| t.id.clone()).collect())).collect();
    got.sort();
    assert_eq!(
        got,
        [("b1".to_string(), 1, vec!["t2".to_string()]), ("b2".to_string(), 0, vec!["t3".to_string()])]
    );
    store
        .apply(&[Update::ReceiptDone { id: "b1".into() }, Update::ReceiptDone { id: "b2".into() }])
        .await
        .expect("apply");
    assert!(store.claim_receipts(now + 100_000, 10, now + 200_000).await.expect("claim").is_empty());
}

async fn expiry(store: &dyn Store) {
    let now = 600_000;
    store.insert_registration(&registration("reg-e", RegistrationState::Active)).await.expect("insert");
    let mut short = message("e1", "reg-e", None, now);
    short.expires_at = now + 100;
    store.enqueue(&short, None, 0).await.expect("enqueue");
    store.enqueue(&message("e2", "reg-e", None, now), None, 0).await.expect("enqueue");
    assert_eq!(store.expire(now + 100).await.expect("expire"), 1);
    let left = store.claim("expo", now + 100, 10, now + 1_000).await.expect("claim");
    assert_eq!(ids(&left), ["e2"]);
    store.apply(&[Update::Delivered { message: "e2".into() }]).await.expect("apply");
}

/// Leaves one claimed message behind, as a process killed mid-delivery does.
pub async fn seed_claimed(store: &dyn Store) {
    let now = now_ms();
    store.insert_registration(&registration("reg-c", RegistrationState::Active)).await.expect("insert");
    store.enqueue(&message("c1", "reg-c", None, now), None, 0).await.expect("enqueue");
    assert_eq!(store.claim("expo", now, 10, now + 3_600_000).await.expect("claim").len(), 1);
}

pub async fn check_reclaimable(store: &dyn Store) {
    let now = now_ms();
    let claimed = store.claim("expo", now, 10, now + 1_000).await.expect("claim");
    assert_eq!(ids(&claimed), ["c1"], "a restarted embedded store releases its leases");
}

pub async fn seed_many(store: &dyn Store, n: usize) {
    store.insert_registration(&registration("reg-m", RegistrationState::Active)).await.expect("insert");
    for i in 0..n {
        store.enqueue(&message(&format!("m{i:04}"), "reg-m", None, 1_000), None, 0).await.expect("enqueue");
    }
}

/// Claims in small batches until nothing is left; returns the ids.
pub async fn claim_all(store: &dyn Store) -> Vec<String> {
    let mut all = Vec::new();
    loop {
        let batch = store.claim("expo", 10_000, 7, 1_000_000).await.expect("claim");
        if batch.is_empty() {
            return all;
        }
        all.extend(batch.into_iter().map(|c| c.message.id));
        tokio::task::yield_now().await;
    }
}

fn now_ms() -> Millis {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as Millis)
        .unwrap_or(0)
}
