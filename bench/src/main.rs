//! `push-relay-bench`: see the crate docs and BENCHMARKS.md.
//!
//! Exit codes: 0 all accepted pushes delivered exactly once; 1 something was
//! lost or duplicated; 2 the run could not be done (setup error).

use clap::Parser;
use push_relay_bench::{relay, run, Options};

fn main() {
    let opts = Options::parse();
    if opts.print_config {
        print!("{}", relay::default_config_template(&opts.queue_lines, &opts.relay_log_level));
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");
    let json = opts.json.clone();
    let report = match rt.block_on(run(opts)) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("push-relay-bench: {e:#}");
            std::process::exit(2);
        }
    };
    println!("{}", report.table());
    if let Some(path) = json {
        let text = serde_json::to_string_pretty(&report).expect("serialize report");
        if let Err(e) = std::fs::write(&path, text + "\n") {
            eprintln!("push-relay-bench: write {}: {e}", path.display());
            std::process::exit(2);
        }
    }
    if !report.ok() {
        eprintln!("push-relay-bench: FAILED: {} lost, {} duplicates", report.lost, report.duplicates);
        std::process::exit(1);
    }
}
