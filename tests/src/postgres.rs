//! Throw-away PostgreSQL databases for store tests.
//!
//! The admin URL is `$PUSH_RELAY_TEST_PG` or `postgres://postgres@127.0.0.1:5432/test`.
//! An unreachable server is a test failure, never a skip.

use tokio_postgres::NoTls;

/// The admin connection URL.
pub fn admin_url() -> String {
    std::env::var("PUSH_RELAY_TEST_PG").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

async fn connect(url: &str) -> tokio_postgres::Client {
    let (client, conn) = match tokio_postgres::connect(url, NoTls).await {
        Ok(c) => c,
        Err(e) => panic!(
            "PostgreSQL is not reachable at {url}: {e}\n\
             Start it: pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start\n\
             (or point PUSH_RELAY_TEST_PG at a server where this user may CREATE DATABASE)"
        ),
    };
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}

/// Replace the database name in a `postgres://` URL.
pub fn with_database(url: &str, db: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let scheme_end = base.find("://").map(|i| i + 3).unwrap_or(0);
    let base = match base[scheme_end..].find('/') {
        Some(i) => &base[..scheme_end + i],
        None => base,
    };
    match query {
        Some(q) => format!("{base}/{db}?{q}"),
        None => format!("{base}/{db}"),
    }
}

/// The database name of a `postgres://` URL.
pub fn database_name(url: &str) -> String {
    let base = url.split('?').next().unwrap();
    let after = &base[base.find("://").map(|i| i + 3).unwrap_or(0)..];
    after.split_once('/').map(|(_, d)| d.to_string()).unwrap_or_default()
}

/// Create a new, empty database `pr_test_<random hex>` and return its URL.
pub async fn fresh_database() -> String {
    let admin = admin_url();
    let client = connect(&admin).await;
    let name = format!("pr_test_{:016x}", rand::random::<u64>());
    client
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .unwrap_or_else(|e| panic!("CREATE DATABASE {name} at {admin}: {e}"));
    with_database(&admin, &name)
}

/// Drop a database made by [`fresh_database`] (best effort: errors ignored,
/// remaining connections forcibly closed).
pub async fn drop_database(url: &str) {
    let name = database_name(url);
    if !name.starts_with("pr_test_") || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return;
    }
    let Ok((client, conn)) = tokio_postgres::connect(&admin_url(), NoTls).await else {
        return;
    };
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let _ = client.batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn url_rewrite() {
        assert_eq!(with_database("postgres://postgres@127.0.0.1:5432/test", "x"), "postgres://postgres@127.0.0.1:5432/x");
        assert_eq!(with_database("postgres://u:p@h/test?sslmode=disable", "x"), "postgres://u:p@h/x?sslmode=disable");
        assert_eq!(with_database("postgres://h", "x"), "postgres://h/x");
        assert_eq!(database_name("postgres://u@h:1/pr_test_ab?x=1"), "pr_test_ab");
    }
}
