use super::*;

fn no_env(_: &str) -> Option<String> {
    None
}

fn parse_ok(source: &str) -> Config {
    match parse_with_env(source, "push-relay.toml", &no_env) {
        Ok(c) => c,
        Err(e) => panic!("unexpected error: {e}"),
    }
}

/// Parses `source` expecting an error; checks its line, key and that the
/// message contains `needle`; returns it for further checks.
#[track_caller]
fn parse_err(source: &str, line: usize, key: &str, needle: &str) -> ConfigError {
    parse_err_env(source, &no_env, line, key, needle)
}

#[track_caller]
fn parse_err_env(
    source: &str,
    env: &dyn Fn(&str) -> Option<String>,
    line: usize,
    key: &str,
    needle: &str,
) -> ConfigError {
    let err = match parse_with_env(source, "push-relay.toml", env) {
        Ok(c) => panic!("expected an error, got {c:?}"),
        Err(e) => e,
    };
    let shown = err.to_string();
    assert_eq!(err.line(), Some(line), "line of: {shown}");
    assert_eq!(err.key(), Some(key), "key of: {shown}");
    assert!(
        shown.contains(needle),
        "{shown:?} should contain {needle:?}"
    );
    assert!(
        shown.starts_with(&format!("push-relay.toml:{line}:")),
        "{shown:?} should start with file:line"
    );
    err
}

fn nz(n: u32) -> NonZeroU32 {
    NonZeroU32::new(n).unwrap()
}

#[test]
fn defaults_equal_empty_file() {
    let c = parse_ok("");
    assert_eq!(c, Config::default());
    assert_eq!(
        c.server.listen,
        "127.0.0.1:8080".parse::<SocketAddr>().unwrap()
    );
    assert_eq!(c.server.public_url.as_str(), "http://127.0.0.1:8080/");
    assert_eq!(c.server.endpoint_base(), "http://127.0.0.1:8080");
    assert_eq!(c.server.log_format, LogFormat::Text);
    assert_eq!(c.server.log_level, "info");
    assert_eq!(c.server.registration_key, None);
    assert!(!c.server.trust_forwarded_for);
    assert_eq!(
        c.store.url,
        StoreUrl::Sqlite(PathBuf::from("push-relay.db"))
    );
    assert_eq!(c.store.pool_size, 16);
    assert_eq!(c.queue.default_ttl_secs, 86_400);
    assert_eq!(c.queue.max_ttl_secs, 2_419_200);
    assert_eq!(c.queue.workers, 2);
    assert_eq!(c.queue.batch_size, 100);
    assert_eq!(c.queue.lease_secs, 60);
    assert_eq!(c.queue.poll_interval_ms, 500);
    assert_eq!(c.queue.retry_base_ms, 1000);
    assert_eq!(c.queue.retry_max_secs, 600);
    assert_eq!(
        c.limits.per_instance,
        Rate {
            count: nz(50),
            period: Duration::from_secs(1),
            burst: nz(200)
        }
    );
    assert_eq!(
        c.limits.per_registration,
        Rate {
            count: nz(2),
            period: Duration::from_secs(1),
            burst: nz(20)
        }
    );
    assert_eq!(
        c.limits.registrations_per_ip,
        Rate {
            count: nz(30),
            period: Duration::from_secs(60),
            burst: nz(30)
        }
    );
    assert_eq!(
        c.limits.registrations_per_ip.replenish_interval(),
        Duration::from_secs(2)
    );
    assert_eq!(c.providers.len(), 1);
    let Some(Provider::Expo(expo)) = c.providers.get("expo") else {
        panic!("no expo provider")
    };
    assert_eq!(c.providers["expo"].kind(), "expo");
    assert_eq!(expo.access_token, None);
    assert_eq!(expo.base_url.as_str(), "https://exp.host/");
    assert_eq!(expo.placeholder_title, "New notification");
    assert_eq!(expo.placeholder_body, "");
    assert_eq!(expo.receipt_delay_secs, 900);
    assert_eq!(expo.timeout_secs, 30);
}

#[test]
fn example_parses_to_the_defaults_with_an_empty_environment() {
    let c = parse_ok(example());
    assert_eq!(c, Config::default());
    // Spot-check a few values explicitly too.
    assert_eq!(c.server.listen.port(), 8080);
    assert_eq!(c.limits.per_instance.burst.get(), 200);
    assert_eq!(
        c.limits.registrations_per_ip.period,
        Duration::from_secs(60)
    );
    assert_eq!(c.providers.keys().collect::<Vec<_>>(), ["expo"]);
    // And every key documented in the example is a real key: uncommenting
    // the commented-out ones still parses.
    let uncommented = example()
        .replace("# registration_key =", "registration_key =")
        .replace("# access_token =", "access_token =");
    let env = |name: &str| match name {
        "PUSH_RELAY_REGISTRATION_KEY" => Some("reg-key".to_owned()),
        "EXPO_ACCESS_TOKEN" => Some("expo-token".to_owned()),
        _ => None,
    };
    let c = parse_with_env(&uncommented, "push-relay.toml", &env).unwrap();
    assert_eq!(
        c.server.registration_key.as_ref().map(Secret::expose),
        Some("reg-key")
    );
    let Provider::Expo(expo) = &c.providers["expo"];
    assert_eq!(
        expo.access_token.as_ref().map(Secret::expose),
        Some("expo-token")
    );
}

#[test]
fn full_file() {
    let c = parse_ok(
        r#"
[server]
listen = "[::]:9000"
public_url = "https://example.org/relay/"
log_format = "json"
log_level = "info,push_relay=debug"
registration_key = "s3cret"
trust_forwarded_for = true

[store]
url = "postgresql://relay:pw@db/relay"
pool_size = 4

[queue]
default_ttl_secs = 60
max_ttl_secs = 3600
workers = 8
batch_size = 1000
lease_secs = 5
poll_interval_ms = 10
retry_base_ms = 1
retry_max_secs = 1

[limits]
per_instance = { per_minute = 600 }
per_registration = { per_second = 1, burst = 5 }

[providers.expo-prod]
kind = "expo"
base_url = "http://localhost:1234/"
placeholder_title = "Hi"
placeholder_body = "You have mail"
receipt_delay_secs = 0
timeout_secs = 1

[providers.b]
kind = "expo"
"#,
    );
    assert_eq!(c.server.listen, "[::]:9000".parse::<SocketAddr>().unwrap());
    assert_eq!(c.server.endpoint_base(), "https://example.org/relay");
    assert_eq!(c.server.log_format, LogFormat::Json);
    assert_eq!(c.server.log_level, "info,push_relay=debug");
    assert_eq!(
        c.server.registration_key.as_ref().unwrap().expose(),
        "s3cret"
    );
    assert!(c.server.trust_forwarded_for);
    assert_eq!(
        c.store.url,
        StoreUrl::Postgres("postgresql://relay:pw@db/relay".into())
    );
    assert_eq!(c.store.pool_size, 4);
    assert_eq!(
        (
            c.queue.default_ttl_secs,
            c.queue.max_ttl_secs,
            c.queue.workers,
            c.queue.batch_size
        ),
        (60, 3600, 8, 1000)
    );
    assert_eq!(
        (
            c.queue.lease_secs,
            c.queue.poll_interval_ms,
            c.queue.retry_base_ms,
            c.queue.retry_max_secs
        ),
        (5, 10, 1, 1)
    );
    assert_eq!(c.limits.per_instance, Rate::per_minute(nz(600), nz(600)));
    assert_eq!(c.limits.per_registration, Rate::per_second(nz(1), nz(5)));
    assert_eq!(
        c.limits.registrations_per_ip,
        Limits::default().registrations_per_ip
    );
    assert_eq!(c.providers.keys().collect::<Vec<_>>(), ["b", "expo-prod"]);
    let Provider::Expo(e) = &c.providers["expo-prod"];
    assert_eq!(e.base_url.as_str(), "http://localhost:1234/");
    assert_eq!(
        (e.placeholder_title.as_str(), e.placeholder_body.as_str()),
        ("Hi", "You have mail")
    );
    assert_eq!((e.receipt_delay_secs, e.timeout_secs), (0, 1));
    assert_eq!(c.providers["b"], Provider::Expo(Expo::default()));
}

#[test]
fn endpoint_base_strips_trailing_slash() {
    let c = parse_ok("[server]\npublic_url = \"https://relay.example\"\n");
    assert_eq!(c.server.endpoint_base(), "https://relay.example");
}

#[test]
fn store_url_forms() {
    for (written, expected) in [
        (
            "sqlite://push-relay.db",
            StoreUrl::Sqlite("push-relay.db".into()),
        ),
        (
            "sqlite:///var/lib/x.db",
            StoreUrl::Sqlite("/var/lib/x.db".into()),
        ),
        ("sqlite://:memory:", StoreUrl::Sqlite(":memory:".into())),
        (
            "postgres://u@h/db",
            StoreUrl::Postgres("postgres://u@h/db".into()),
        ),
    ] {
        let c = parse_ok(&format!("[store]\nurl = \"{written}\"\n"));
        assert_eq!(c.store.url, expected, "{written}");
    }
}

#[test]
fn unknown_field() {
    let e = parse_err(
        "[server]\nlisten = \"127.0.0.1:1\"\nlisen = \"x\"\n",
        3,
        "server.lisen",
        "unknown field `lisen`",
    );
    assert_eq!(e.column(), Some(1));
    assert!(
        e.to_string().contains("`public_url`"),
        "lists expected keys: {e}"
    );
    parse_err("[sever]\n", 1, "sever", "unknown field `sever`");
    parse_err(
        "[limits]\nper_instance = { per_second = 5, brust = 2 }\n",
        2,
        "limits.per_instance.brust",
        "unknown field `brust`",
    );
    parse_err(
        "[providers.expo]\nkind = \"expo\"\ntoken = \"x\"\n",
        3,
        "providers.expo.token",
        "unknown field `token`",
    );
}

#[test]
fn wrong_type() {
    let e = parse_err(
        "[store]\npool_size = \"16\"\n",
        2,
        "store.pool_size",
        "invalid type",
    );
    assert_eq!(e.column(), Some(13));
    parse_err(
        "[queue]\nworkers = -1\n",
        2,
        "queue.workers",
        "expected a non-negative integer",
    );
    parse_err(
        "[server]\ntrust_forwarded_for = \"yes\"\n",
        2,
        "server.trust_forwarded_for",
        "invalid type",
    );
    parse_err(
        "[limits]\nper_instance = { per_second = \"5\" }\n",
        2,
        "limits.per_instance.per_second",
        "invalid type",
    );
    parse_err("server = 5\n", 1, "server", "invalid type");
}

#[test]
fn missing_field() {
    parse_err(
        "[providers.expo]\nbase_url = \"https://exp.host\"\n",
        1,
        "providers.expo.kind",
        "missing field `kind`",
    );
}

#[test]
fn bad_socket_address() {
    let e = parse_err(
        "# comment\n\n[server]\nlisten = \"localhost\"\n",
        4,
        "server.listen",
        "invalid socket address syntax",
    );
    assert_eq!(e.column(), Some(10));
    assert!(
        e.to_string().contains("expected e.g. \"127.0.0.1:8080\""),
        "{e}"
    );
    assert_eq!(
        e.message(),
        e.to_string().split_once("`server.listen`: ").unwrap().1
    );
}

#[test]
fn bad_urls() {
    parse_err(
        "[server]\npublic_url = \"not a url\"\n",
        2,
        "server.public_url",
        "invalid URL",
    );
    parse_err(
        "[server]\npublic_url = \"ftp://x.org\"\n",
        2,
        "server.public_url",
        "http or https",
    );
    parse_err(
        "[server]\npublic_url = \"https://x.org/?a=b\"\n",
        2,
        "server.public_url",
        "query",
    );
    parse_err(
        "[server]\npublic_url = \"https://x.org/#top\"\n",
        2,
        "server.public_url",
        "fragment",
    );
    parse_err(
        "[providers.expo]\nkind = \"expo\"\nbase_url = \"exp.host\"\n",
        3,
        "providers.expo.base_url",
        "invalid URL",
    );
}

#[test]
fn bad_store_url() {
    let e = parse_err(
        "[store]\nurl = \"mysql://u:pw@h/db\"\n",
        2,
        "store.url",
        "sqlite://",
    );
    let shown = e.to_string();
    assert!(shown.contains("postgres://"), "{shown}");
    assert!(
        !shown.contains("pw"),
        "password must not be echoed: {shown}"
    );
    parse_err(
        "[store]\nurl = \"sqlite://\"\n",
        2,
        "store.url",
        "unsupported store URL",
    );
}

#[test]
fn zero_rate() {
    parse_err(
        "[limits]\nper_registration = { per_second = 0 }\n",
        2,
        "limits.per_registration.per_second",
        "must be at least 1",
    );
    parse_err(
        "[limits.per_instance]\nper_minute = 10\nburst = 0\n",
        3,
        "limits.per_instance.burst",
        "must be at least 1",
    );
}

#[test]
fn rate_needs_exactly_one_period() {
    parse_err(
        "[limits]\nper_instance = { per_second = 1, per_minute = 60 }\n",
        2,
        "limits.per_instance.per_minute",
        "not both",
    );
    parse_err(
        "[limits]\nper_instance = { burst = 3 }\n",
        2,
        "limits.per_instance",
        "exactly one of",
    );
}

#[test]
fn other_ranges() {
    parse_err(
        "[queue]\nbatch_size = 1001\n",
        2,
        "queue.batch_size",
        "at most 1000",
    );
    parse_err("[queue]\nworkers = 0\n", 2, "queue.workers", "at least 1");
    parse_err(
        "[queue]\npoll_interval_ms = 5\n",
        2,
        "queue.poll_interval_ms",
        "at least 10",
    );
    parse_err(
        "[store]\npool_size = 0\n",
        2,
        "store.pool_size",
        "at least 1",
    );
    parse_err(
        "[queue]\nmax_ttl_secs = 60\n",
        2,
        "queue.max_ttl_secs",
        "must not exceed",
    );
    parse_err(
        "[server]\nlog_format = \"xml\"\n",
        2,
        "server.log_format",
        "\"text\" or \"json\"",
    );
    parse_err(
        "[server]\nregistration_key = \"\"\n",
        2,
        "server.registration_key",
        "must not be empty",
    );
    parse_err("[providers]\n", 1, "providers", "no provider configured");
}

#[test]
fn unknown_provider_kind() {
    let e = parse_err(
        "[providers.ios]\nkind = \"apns\"\n",
        2,
        "providers.ios.kind",
        "unknown provider kind \"apns\"",
    );
    assert!(e.to_string().contains("expected one of: expo"), "{e}");
}

#[test]
fn bad_provider_name() {
    parse_err(
        "[providers.Expo]\nkind = \"expo\"\n",
        1,
        "providers.Expo",
        "invalid provider name",
    );
    parse_err(
        "[providers._x]\nkind = \"expo\"\n",
        1,
        "providers._x",
        "invalid provider name",
    );
    let long = "a".repeat(65);
    parse_err(
        &format!("[providers.{long}]\nkind = \"expo\"\n"),
        1,
        &format!("providers.{long}"),
        "1 to 64",
    );
    let ok = "a".repeat(64);
    parse_ok(&format!(
        "[providers.{ok}]\nkind = \"expo\"\n[providers.0-x_y]\nkind = \"expo\"\n"
    ));
}

#[test]
fn env_expansion() {
    let env = |name: &str| match name {
        "TOKEN" => Some("tok-123".to_owned()),
        "PORT" => Some("9999".to_owned()),
        _ => None,
    };
    let c = parse_with_env(
        "[server]\nlisten = \"0.0.0.0:${PORT}\"\nregistration_key = \"${TOKEN}\"\n\
         [providers.expo]\nkind = \"expo\"\naccess_token = \"${TOKEN}\"\nplaceholder_body = \"costs $$5 ${PORT}\"\n",
        "push-relay.toml",
        &env,
    )
    .unwrap();
    assert_eq!(c.server.listen.port(), 9999);
    assert_eq!(c.server.registration_key.unwrap().expose(), "tok-123");
    let Provider::Expo(e) = &c.providers["expo"];
    assert_eq!(e.access_token.as_ref().unwrap().expose(), "tok-123");
    assert_eq!(e.placeholder_body, "costs $5 9999");
}

#[test]
fn dollar_dollar_is_literal() {
    let c = parse_ok("[server]\nregistration_key = \"pa$$word$${NOT_EXPANDED}\"\n");
    assert_eq!(
        c.server.registration_key.unwrap().expose(),
        "pa$word${NOT_EXPANDED}"
    );
}

#[test]
fn missing_env_var() {
    let e = parse_err(
        "[providers.expo]\nkind = \"expo\"\n\naccess_token = \"${EXPO_ACCESS_TOKEN}\"\n",
        4,
        "providers.expo.access_token",
        "`EXPO_ACCESS_TOKEN` is not set",
    );
    assert_eq!(e.column(), Some(16));
    parse_err(
        "[server]\nlog_level = \"$LEVEL\"\n",
        2,
        "server.log_level",
        "lone `$`",
    );
    parse_err(
        "[limits]\n[server]\npublic_url = \"https://${HOST\"\n",
        3,
        "server.public_url",
        "unterminated",
    );
}

#[test]
fn access_token_file_missing() {
    let dir = tempfile::tempdir().unwrap();
    let origin = dir.path().join("push-relay.toml");
    let origin = origin.to_str().unwrap();
    let err = parse_with_env(
        "[providers.expo]\nkind = \"expo\"\naccess_token_file = \"nope.txt\"\n",
        origin,
        &no_env,
    )
    .unwrap_err();
    let shown = err.to_string();
    assert_eq!(err.line(), Some(3), "{shown}");
    assert_eq!(err.key(), Some("providers.expo.access_token_file"));
    assert!(shown.starts_with(&format!("{origin}:3:21: ")), "{shown}");
    assert!(
        shown.contains(&dir.path().join("nope.txt").display().to_string()),
        "{shown}"
    );
    assert!(shown.contains("os error"), "{shown}");
}

#[test]
fn access_token_file_and_token_conflict() {
    parse_err(
        "[providers.expo]\nkind = \"expo\"\naccess_token = \"a\"\naccess_token_file = \"b\"\n",
        4,
        "providers.expo.access_token_file",
        "not both",
    );
}

#[test]
fn access_token_file_read() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("expo.token"), "  tok-from-file\n").unwrap();
    std::fs::write(dir.path().join("empty.token"), "\n").unwrap();
    let config_path = dir.path().join("push-relay.toml");
    // Relative to the config file's directory, through `load`.
    std::fs::write(
        &config_path,
        "[providers.expo]\nkind = \"expo\"\naccess_token_file = \"expo.token\"\n",
    )
    .unwrap();
    let c = load(&config_path).unwrap();
    let Provider::Expo(e) = &c.providers["expo"];
    assert_eq!(e.access_token.as_ref().unwrap().expose(), "tok-from-file");
    // Absolute path.
    let absolute = dir.path().join("expo.token");
    let c = parse_ok(&format!(
        "[providers.expo]\nkind = \"expo\"\naccess_token_file = {:?}\n",
        absolute.to_str().unwrap()
    ));
    let Provider::Expo(e) = &c.providers["expo"];
    assert_eq!(e.access_token.as_ref().unwrap().expose(), "tok-from-file");
    // An empty file is refused.
    std::fs::write(
        &config_path,
        "[providers.expo]\nkind = \"expo\"\naccess_token_file = \"empty.token\"\n",
    )
    .unwrap();
    let err = load(&config_path).unwrap_err();
    assert_eq!(err.key(), Some("providers.expo.access_token_file"));
    assert!(err.to_string().contains("is empty"), "{err}");
}

#[test]
fn load_missing_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("absent.toml");
    let err = load(&path).unwrap_err();
    assert_eq!(err.line(), None);
    assert!(
        err.to_string().starts_with(&path.display().to_string()),
        "{err}"
    );
    assert!(err.to_string().contains("cannot read"), "{err}");
}

#[test]
fn secret_is_redacted() {
    let s = Secret::new("hunter2");
    assert_eq!(format!("{s:?}"), "***");
    assert_eq!(s.to_string(), "***");
    assert_eq!(s.expose(), "hunter2");
    let c = parse_ok("[server]\nregistration_key = \"hunter2\"\n");
    assert!(!format!("{c:?}").contains("hunter2"));
}

#[test]
fn syntax_error() {
    let e = match parse_with_env(
        "[server]\nlog_level = \"info\n\n",
        "push-relay.toml",
        &no_env,
    ) {
        Err(e) => e,
        Ok(c) => panic!("{c:?}"),
    };
    assert_eq!(e.line(), Some(2), "{e}");
    assert!(e.to_string().starts_with("push-relay.toml:2:"), "{e}");
    assert!(!e.to_string().contains('\n'), "one line: {e:?}");
    // Duplicate key.
    let e = parse_with_env("[queue]\nworkers = 1\nworkers = 2\n", "x.toml", &no_env).unwrap_err();
    assert_eq!(e.line(), Some(3), "{e}");
}

#[test]
fn never_panics_on_odd_input() {
    for src in [
        "\u{feff}",
        "[",
        "[[providers]]",
        "providers = 1",
        "providers = { \"é\" = { kind = \"expo\" } }",
        "[server]\nlisten = \"\u{1F600}\"",
        "[limits]\nper_instance = 5",
        "a.b.c = { d = [1, {e = 2}] }",
        "[providers.x]\nkind = 1",
        "\"\" = 1",
        "[server]\npublic_url = \"http://[::1\"",
    ] {
        assert!(
            parse_with_env(src, "x.toml", &no_env).is_err() || src == "\u{feff}",
            "{src:?}"
        );
    }
}
