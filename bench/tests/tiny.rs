//! A tiny benchmark run through the library entry point: 20 registrations,
//! 200 pushes, the debug relay binary (`cargo build -p push-relay` first, or
//! `PUSH_RELAY_BIN`). Asserts every push got 201 and reached the sink
//! exactly once.

use clap::Parser;
use push_relay_bench::{run, Options};

async fn tiny(extra: &[&str]) -> push_relay_bench::Report {
    let mut args = vec![
        "push-relay-bench",
        "--registrations", "20",
        "--pushes", "200",
        "--connections", "8",
        "--skip-ceiling",
        "--drain-timeout", "10",
        "--settle-ms", "300",
        "--quiet",
    ];
    args.extend_from_slice(extra);
    let report = run(Options::parse_from(args)).await.expect("benchmark run");
    println!("{}", report.table());
    assert_eq!(report.accepted, 200, "every push answered 201: {:?}", report.answers);
    assert_eq!(report.answers.get("201"), Some(&200), "answers: {:?}", report.answers);
    assert_eq!(report.lost, 0, "nothing lost");
    assert_eq!(report.duplicates, 0, "no duplicates");
    assert_eq!(report.delivered, 200);
    assert_eq!(report.unknown_at_sink, 0);
    assert!(report.ok());
    assert!(report.relay_peak_rss_kb > 0, "RSS sampled");
    report
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tiny_run_sqlite_mixed() {
    let r = tiny(&["--mode", "mixed", "--encoding", "mixed"]).await;
    // Half the registrations allow decryption: those pushes arrive decrypted.
    assert_eq!(r.sink_decrypted, 100, "decrypted deliveries");
    assert!(r.latency_201.count == 200 && r.delivery_latency.count == 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tiny_run_fixed_rate() {
    let r = tiny(&["--rate", "400"]).await;
    assert!(r.latency_201_from_schedule.is_some());
    assert!(r.send_seconds >= 0.45, "200 pushes at 400/s take about half a second, took {}", r.send_seconds);
}
