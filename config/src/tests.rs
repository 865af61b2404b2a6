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
    assert_eq!(c.queue.workers, 8);
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
    let Provider::Expo(expo) = &c.providers["expo"] else { panic!("not expo") };
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
workers = 3
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
        (60, 3600, 3, 1000)
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
    let Provider::Expo(e) = &c.providers["expo-prod"] else { panic!("not expo") };
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
        "[providers.ios]\nkind = \"hms\"\n",
        2,
        "providers.ios.kind",
        "unknown provider kind \"hms\"",
    );
    assert!(e.to_string().contains("expected one of: expo, apns, fcm"), "{e}");
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
    let Provider::Expo(e) = &c.providers["expo"] else { panic!("not expo") };
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
    let Provider::Expo(e) = &c.providers["expo"] else { panic!("not expo") };
    assert_eq!(e.access_token.as_ref().unwrap().expose(), "tok-from-file");
    // Absolute path.
    let absolute = dir.path().join("expo.token");
    let c = parse_ok(&format!(
        "[providers.expo]\nkind = \"expo\"\naccess_token_file = {:?}\n",
        absolute.to_str().unwrap()
    ));
    let Provider::Expo(e) = &c.providers["expo"] else { panic!("not expo") };
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

/// A temporary directory holding a config file's neighbours.
struct Dir(tempfile::TempDir);

impl Dir {
    fn new() -> Dir {
        Dir(tempfile::tempdir().unwrap())
    }

    fn write(&self, name: &str, contents: &str) -> &Self {
        std::fs::write(self.0.path().join(name), contents).unwrap();
        self
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.path().join(name)
    }

    /// The config file's name in error messages, inside this directory.
    fn origin(&self) -> String {
        self.path("push-relay.toml").to_str().unwrap().to_owned()
    }

    fn parse(&self, source: &str) -> std::result::Result<Config, ConfigError> {
        parse_with_env(source, &self.origin(), &no_env)
    }

    #[track_caller]
    fn parse_ok(&self, source: &str) -> Config {
        self.parse(source).unwrap_or_else(|e| panic!("unexpected error: {e}"))
    }

    /// Expects an error at `line` about `key` whose text contains every needle.
    #[track_caller]
    fn parse_err(&self, source: &str, line: usize, key: &str, needles: &[&str]) -> ConfigError {
        let err = match self.parse(source) {
            Ok(c) => panic!("expected an error, got {c:?}"),
            Err(e) => e,
        };
        let shown = err.to_string();
        assert!(shown.starts_with(&format!("{}:{line}:", self.origin())), "{shown}");
        assert_eq!(err.key(), Some(key), "{shown}");
        for needle in needles {
            assert!(shown.contains(needle), "{shown:?} should contain {needle:?}");
        }
        err
    }
}

const FAKE_KEY: &str = "-----BEGIN PRIVATE KEY-----\nMIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQg\n-----END PRIVATE KEY-----\n";
const FAKE_CERT: &str = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";

fn service_account_json() -> String {
    serde_json::json!({
        "type": "service_account",
        "project_id": "demo-project",
        "private_key_id": "abc",
        "private_key": FAKE_KEY,
        "client_email": "relay@demo-project.iam.gserviceaccount.com",
        "token_uri": "https://oauth2.example/token",
    })
    .to_string()
}

fn keys_dir() -> Dir {
    let dir = Dir::new();
    dir.write("AuthKey_ABC123DEFG.p8", FAKE_KEY)
        .write("apns-cert.pem", FAKE_CERT)
        .write("apns-key.pem", FAKE_KEY)
        .write("test-ca.pem", FAKE_CERT)
        .write("service-account.json", &service_account_json());
    dir
}

#[test]
fn example_apns_and_fcm_sections_parse_when_uncommented() {
    let dir = keys_dir();
    let example = example();
    let start = example.find("# --- APNs").expect("the example has an APNs section");
    let uncomment = |skip: &[&str]| {
        let mut out = example[..start].to_owned();
        for line in example[start..].lines() {
            let is_setting = line.starts_with("# [providers.")
                || line
                    .strip_prefix("# ")
                    .and_then(|rest| rest.split_once(" = "))
                    .is_some_and(|(k, _)| k.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'));
            if is_setting && !skip.iter().any(|s| line.starts_with(&format!("# {s} ="))) {
                out.push_str(&line[2..]);
            } else {
                out.push_str(line);
            }
            out.push('\n');
        }
        out
    };
    // Token auth (the certificate keys stay commented out).
    let c = dir.parse_ok(&uncomment(&["cert_file", "cert_key_file"]));
    assert_eq!(c.providers.keys().collect::<Vec<_>>(), ["android", "expo", "ios"]);
    let Provider::Apns(ios) = &c.providers["ios"] else { panic!("not apns") };
    let ApnsAuth::Token { key, key_id, team_id } = &ios.auth else { panic!("not token auth") };
    assert_eq!(key.path, dir.path("AuthKey_ABC123DEFG.p8"));
    assert_eq!(key.contents.expose(), FAKE_KEY);
    assert_eq!((key_id.as_str(), team_id.as_str()), ("ABC123DEFG", "DEF123GHIJ"));
    assert_eq!(ios.topic, "org.example.app");
    assert_eq!(ios.environment, ApnsEnvironment::Production);
    assert_eq!(ios.base_url.as_str(), "https://api.push.apple.com/");
    assert_eq!(ios.ca_file.as_ref().unwrap().path, dir.path("test-ca.pem"));
    assert_eq!((ios.placeholder_title.as_str(), ios.placeholder_body.as_str()), ("New notification", ""));
    assert_eq!((ios.sound.as_str(), ios.timeout_secs), ("default", 30));
    let Provider::Fcm(android) = &c.providers["android"] else { panic!("not fcm") };
    assert_eq!(android.service_account.path, dir.path("service-account.json"));
    assert_eq!(android.service_account.project_id, "demo-project");
    assert_eq!(android.service_account.client_email, "relay@demo-project.iam.gserviceaccount.com");
    assert_eq!(android.service_account.private_key.expose(), FAKE_KEY.trim());
    assert_eq!(android.service_account.token_uri.as_str(), "https://oauth2.example/token");
    assert_eq!(android.base_url.as_str(), "https://fcm.googleapis.com/");
    assert_eq!((android.placeholder_title.as_str(), android.timeout_secs), ("New notification", 30));
    // Certificate auth (the token keys stay commented out).
    let c = dir.parse_ok(&uncomment(&["key_file", "key_id", "team_id"]));
    let Provider::Apns(ios) = &c.providers["ios"] else { panic!("not apns") };
    let ApnsAuth::Certificate { cert, key } = &ios.auth else { panic!("not certificate auth") };
    assert_eq!((cert.path.clone(), key.path.clone()), (dir.path("apns-cert.pem"), dir.path("apns-key.pem")));
    // Both at once is refused.
    let err = dir.parse(&uncomment(&[])).unwrap_err();
    assert_eq!(err.key(), Some("providers.ios.cert_file"), "{err}");
    assert!(err.to_string().contains("not both"), "{err}");
}

#[test]
fn apns_keys() {
    let dir = keys_dir();
    let c = dir.parse_ok(
        r#"
[providers.ios-beta]
kind = "apns"
key_file = "AuthKey_ABC123DEFG.p8"
key_id = "ABC123DEFG"
team_id = "TEAM123456"
topic = "org.example.app.beta"
environment = "sandbox"
placeholder_title = "Hi"
placeholder_body = "New post"
sound = "chime.caf"
timeout_secs = 5

[providers.ios-test]
kind = "apns"
cert_file = "apns-cert.pem"
cert_key_file = "apns-key.pem"
topic = "org.example.app"
environment = "sandbox"
base_url = "https://127.0.0.1:8443"
ca_file = "test-ca.pem"
"#,
    );
    let Provider::Apns(beta) = &c.providers["ios-beta"] else { panic!("not apns") };
    assert_eq!(c.providers["ios-beta"].kind(), "apns");
    assert_eq!(beta.environment, ApnsEnvironment::Sandbox);
    assert_eq!(beta.base_url.as_str(), "https://api.sandbox.push.apple.com/");
    assert_eq!(beta.ca_file, None);
    assert_eq!(
        (beta.placeholder_title.as_str(), beta.placeholder_body.as_str(), beta.sound.as_str(), beta.timeout_secs),
        ("Hi", "New post", "chime.caf", 5)
    );
    assert!(!format!("{beta:?}").contains("BEGIN"), "key contents are redacted");
    let Provider::Apns(test) = &c.providers["ios-test"] else { panic!("not apns") };
    assert_eq!(test.base_url.as_str(), "https://127.0.0.1:8443/", "base_url overrides environment");
    assert_eq!(test.ca_file.as_ref().unwrap().contents.expose(), FAKE_CERT);
    assert!(matches!(test.auth, ApnsAuth::Certificate { .. }));
}

#[test]
fn apns_errors() {
    let dir = keys_dir();
    let head = "[providers.ios]\nkind = \"apns\"\n";
    let token = "key_file = \"AuthKey_ABC123DEFG.p8\"\nkey_id = \"ABC123DEFG\"\nteam_id = \"TEAM123456\"\n";
    // Unreadable key file: key, line, resolved path and the OS error.
    let e = dir.parse_err(
        &format!("{head}key_file = \"AuthKey_NOPE.p8\"\nkey_id = \"K\"\nteam_id = \"T\"\ntopic = \"a.b\"\n"),
        3,
        "providers.ios.key_file",
        &["cannot read", "os error", &dir.path("AuthKey_NOPE.p8").display().to_string()],
    );
    assert_eq!(e.column(), Some(12));
    dir.write("not-pem.p8", "hello\n");
    dir.parse_err(
        &format!("{head}key_file = \"not-pem.p8\"\nkey_id = \"K\"\nteam_id = \"T\"\ntopic = \"a.b\"\n"),
        3,
        "providers.ios.key_file",
        &["is not a PEM file"],
    );
    dir.write("empty.p8", "\n");
    dir.parse_err(
        &format!("{head}key_file = \"empty.p8\"\nkey_id = \"K\"\nteam_id = \"T\"\ntopic = \"a.b\"\n"),
        3,
        "providers.ios.key_file",
        &["is empty"],
    );
    // Missing pieces.
    dir.parse_err(
        &format!("{head}key_file = \"AuthKey_ABC123DEFG.p8\"\nteam_id = \"T\"\ntopic = \"a.b\"\n"),
        1,
        "providers.ios.key_id",
        &["missing key `key_id`"],
    );
    dir.parse_err(
        &format!("{head}cert_file = \"apns-cert.pem\"\ntopic = \"a.b\"\n"),
        1,
        "providers.ios.cert_key_file",
        &["missing key `cert_key_file`"],
    );
    dir.parse_err(&format!("{head}topic = \"a.b\"\n"), 1, "providers.ios.key_file", &["no APNs credentials"]);
    dir.parse_err(&format!("{head}{token}"), 1, "providers.ios.topic", &["missing key `topic`", "bundle id"]);
    // Both methods.
    dir.parse_err(
        &format!("{head}{token}cert_key_file = \"apns-key.pem\"\ntopic = \"a.b\"\n"),
        6,
        "providers.ios.cert_key_file",
        &["not both"],
    );
    // Bad values.
    dir.parse_err(
        &format!("{head}{token}topic = \"a.b\"\nenvironment = \"development\"\n"),
        7,
        "providers.ios.environment",
        &["\"production\" or \"sandbox\""],
    );
    dir.parse_err(
        &format!("{head}key_file = \"AuthKey_ABC123DEFG.p8\"\nkey_id = \"ABC 123\"\nteam_id = \"T\"\ntopic = \"a.b\"\n"),
        4,
        "providers.ios.key_id",
        &["invalid id"],
    );
    dir.parse_err(&format!("{head}{token}topic = \"\"\n"), 6, "providers.ios.topic", &["invalid topic"]);
    dir.parse_err(
        &format!("{head}{token}topic = \"a.b\"\nbase_url = \"api.push.apple.com\"\n"),
        7,
        "providers.ios.base_url",
        &["invalid URL"],
    );
    dir.parse_err(
        &format!("{head}{token}topic = \"a.b\"\ntimeout_secs = 0\n"),
        7,
        "providers.ios.timeout_secs",
        &["at least 1"],
    );
    // A key of another kind.
    dir.parse_err(
        &format!("{head}{token}topic = \"a.b\"\naccess_token = \"x\"\n"),
        7,
        "providers.ios.access_token",
        &["not a key of kind \"apns\"", "key_file"],
    );
}

#[test]
fn fcm_keys_and_errors() {
    let dir = keys_dir();
    let c = dir.parse_ok(
        "[providers.android]\nkind = \"fcm\"\nservice_account_file = \"service-account.json\"\n\
         base_url = \"http://127.0.0.1:9999/\"\nplaceholder_title = \"Hi\"\nplaceholder_body = \"x\"\ntimeout_secs = 3\n",
    );
    let Provider::Fcm(f) = &c.providers["android"] else { panic!("not fcm") };
    assert_eq!(c.providers["android"].kind(), "fcm");
    assert_eq!(f.base_url.as_str(), "http://127.0.0.1:9999/");
    assert_eq!((f.placeholder_title.as_str(), f.placeholder_body.as_str(), f.timeout_secs), ("Hi", "x", 3));
    assert!(!format!("{f:?}").contains("BEGIN"), "the private key is redacted");
    // token_uri defaults to Google's.
    let mut account: serde_json::Value = serde_json::from_str(&service_account_json()).unwrap();
    account.as_object_mut().unwrap().remove("token_uri");
    dir.write("no-uri.json", &account.to_string());
    let c = dir.parse_ok("[providers.android]\nkind = \"fcm\"\nservice_account_file = \"no-uri.json\"\n");
    let Provider::Fcm(f) = &c.providers["android"] else { panic!("not fcm") };
    assert_eq!(f.service_account.token_uri.as_str(), "https://oauth2.googleapis.com/token");

    let head = "[providers.android]\nkind = \"fcm\"\n";
    dir.parse_err(head, 1, "providers.android.service_account_file", &["missing key `service_account_file`"]);
    dir.parse_err(
        &format!("{head}service_account_file = \"absent.json\"\n"),
        3,
        "providers.android.service_account_file",
        &["cannot read", "os error", &dir.path("absent.json").display().to_string()],
    );
    dir.write("broken.json", "{\"project_id\": ");
    dir.parse_err(
        &format!("{head}service_account_file = \"broken.json\"\n"),
        3,
        "providers.android.service_account_file",
        &["is not JSON"],
    );
    account.as_object_mut().unwrap().remove("private_key");
    account.as_object_mut().unwrap().insert("client_email".into(), "".into());
    dir.write("partial.json", &account.to_string());
    dir.parse_err(
        &format!("{head}service_account_file = \"partial.json\"\n"),
        3,
        "providers.android.service_account_file",
        &["lacks client_email, private_key"],
    );
    dir.write("google-services.json", r#"{"project_info": {"project_id": "x"}, "client": []}"#);
    dir.parse_err(
        &format!("{head}service_account_file = \"google-services.json\"\n"),
        3,
        "providers.android.service_account_file",
        &["google-services.json, not a service-account key"],
    );
    dir.write("user.json", r#"{"type": "authorized_user", "client_id": "x"}"#);
    dir.parse_err(
        &format!("{head}service_account_file = \"user.json\"\n"),
        3,
        "providers.android.service_account_file",
        &["\"authorized_user\" credential"],
    );
    let mut bad_uri: serde_json::Value = serde_json::from_str(&service_account_json()).unwrap();
    bad_uri["token_uri"] = "oauth2.googleapis.com/token".into();
    dir.write("bad-uri.json", &bad_uri.to_string());
    dir.parse_err(
        &format!("{head}service_account_file = \"bad-uri.json\"\n"),
        3,
        "providers.android.service_account_file",
        &["token_uri"],
    );
    dir.parse_err(
        &format!("{head}service_account_file = \"service-account.json\"\ntopic = \"a.b\"\n"),
        4,
        "providers.android.topic",
        &["not a key of kind \"fcm\""],
    );
    // And Expo refuses APNs keys.
    dir.parse_err(
        "[providers.expo]\nkind = \"expo\"\nsound = \"x\"\n",
        3,
        "providers.expo.sound",
        &["not a key of kind \"expo\""],
    );
}

#[test]
fn several_providers_of_each_kind() {
    let dir = keys_dir();
    dir.write("other.p8", FAKE_KEY);
    let c = dir.parse_ok(
        r#"
[providers.ios-prod]
kind = "apns"
key_file = "AuthKey_ABC123DEFG.p8"
key_id = "ABC123DEFG"
team_id = "TEAM123456"
topic = "org.example.app"

[providers.ios-beta]
kind = "apns"
key_file = "other.p8"
key_id = "OTHERKEY12"
team_id = "TEAM999999"
topic = "org.example.beta"
environment = "sandbox"

[providers.android]
kind = "fcm"
service_account_file = "service-account.json"

[providers.android-2]
kind = "fcm"
service_account_file = "service-account.json"

[providers.expo]
kind = "expo"
"#,
    );
    let kinds: Vec<(&str, &str)> = c.providers.iter().map(|(n, p)| (n.as_str(), p.kind())).collect();
    assert_eq!(
        kinds,
        [("android", "fcm"), ("android-2", "fcm"), ("expo", "expo"), ("ios-beta", "apns"), ("ios-prod", "apns")]
    );
    let (Provider::Apns(prod), Provider::Apns(beta)) = (&c.providers["ios-prod"], &c.providers["ios-beta"]) else {
        panic!("not apns")
    };
    assert_ne!(prod.auth, beta.auth);
    assert_ne!(prod.base_url, beta.base_url);
}
