//! A plugin that misbehaves on purpose, for the host's tests. Its config
//! (`{"mode": "..."}`) picks how:
//!
//! | mode | in `check` |
//! |---|---|
//! | `ok` | delivers (a well-behaved baseline) |
//! | `loop` | loops forever (fuel or the epoch deadline must stop it) |
//! | `memory` | allocates without end (the memory cap must stop it) |
//! | `trap` | executes `unreachable` |
//! | `panic` | panics (the SDK logs the message, then the plugin traps) |
//! | `bad-utf8` | answers a drop reason that is not UTF-8 (garbage the host must refuse) |
//! | `too-many-tags` | answers 10 000 tags (garbage the host must refuse) |
//! | `sleep` | spins ~`spin` iterations, then delivers (for deadline tests) |
//!
//! `{"mode": "fail-configure"}` makes `configure` fail.

#![cfg_attr(target_arch = "wasm32", no_std)]
extern crate alloc;

use alloc::string::{String, ToString};
use alloc::vec::Vec;
use alloc::{format, vec};

use push_relay_plugin_sdk::{export_filter, Changes, Filter, Notification, Verdict};

struct Hostile {
    mode: String,
    spin: u64,
}

fn field<'a>(json: &'a str, key: &str) -> Option<&'a str> {
    // A tiny reader for `"key": "value"` / `"key": 123`, to keep this crate dependency-free.
    let at = json.find(&format!("\"{key}\""))? + key.len() + 2;
    let rest = json[at..].trim_start().strip_prefix(':')?.trim_start();
    if let Some(s) = rest.strip_prefix('"') {
        return s.split('"').next();
    }
    let end = rest.find(|c: char| !c.is_ascii_digit()).unwrap_or(rest.len());
    Some(&rest[..end])
}

impl Filter for Hostile {
    const NAME: &'static str = "hostile";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");

    fn configure(config_json: &str) -> Result<Self, String> {
        let mode = field(config_json, "mode").unwrap_or("ok").to_string();
        if mode == "fail-configure" {
            return Err("configured to fail".into());
        }
        let spin = field(config_json, "spin").and_then(|s| s.parse().ok()).unwrap_or(0);
        Ok(Hostile { mode, spin })
    }

    fn check(&mut self, n: &Notification) -> Verdict {
        match self.mode.as_str() {
            "loop" => {
                let mut i: u64 = 0;
                loop {
                    i = core::hint::black_box(i.wrapping_add(1));
                }
            }
            "memory" => {
                let mut hoard: Vec<Vec<u8>> = Vec::new();
                loop {
                    let mut chunk = vec![0u8; 1 << 20];
                    chunk[n.body_size as usize % (1 << 20)] = 1;
                    hoard.push(core::hint::black_box(chunk));
                }
            }
            "trap" => {
                #[cfg(target_arch = "wasm32")]
                core::arch::wasm32::unreachable();
                #[cfg(not(target_arch = "wasm32"))]
                unreachable!()
            }
            "panic" => panic!("hostile plugin panics on purpose for {}", n.instance),
            "bad-utf8" => Verdict::Drop(unsafe { String::from_utf8_unchecked(vec![0xff, 0xfe, 0xfd]) }),
            "too-many-tags" => Verdict::DeliverWithChanges(Changes {
                urgency: None,
                ttl: None,
                tags: (0..10_000).map(|i| format!("tag-{i}")).collect(),
            }),
            "sleep" => {
                let mut x: u64 = 0;
                for i in 0..self.spin {
                    x = core::hint::black_box(x.wrapping_add(i));
                }
                Verdict::Deliver
            }
            _ => Verdict::Deliver,
        }
    }
}

export_filter!(Hostile);
