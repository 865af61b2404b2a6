//! Write [push-relay](https://github.com/) filter plugins in Rust.
//!
//! A plugin is a type implementing [`Filter`], exported with
//! [`export_filter!`], built as a `cdylib` for `wasm32-wasip2`:
//!
//! ```ignore
//! use push_relay_plugin_sdk::{export_filter, Filter, Notification, Verdict};
//!
//! struct NoFollows;
//!
//! impl Filter for NoFollows {
//!     const NAME: &'static str = "no-follows";
//!     const VERSION: &'static str = env!("CARGO_PKG_VERSION");
//!     fn configure(_config: &str) -> Result<Self, String> {
//!         Ok(NoFollows)
//!     }
//!     fn check(&mut self, n: &Notification) -> Verdict {
//!         match &n.payload {
//!             Some(p) if p.notification_type == "follow" => Verdict::Drop("follows are muted".into()),
//!             _ => Verdict::Deliver,
//!         }
//!     }
//! }
//!
//! export_filter!(NoFollows);
//! ```
//!
//! The same code compiles natively, so the filter logic is tested with a
//! plain `cargo test`: [`log`] then prints to stderr and records the line
//! for [`testing::logs`], and [`count`] uses an in-memory counter whose
//! clock [`testing::advance`] moves.
//!
//! A panic inside the plugin is reported through [`log`] (level error, with
//! the panic message and location) before the plugin traps; the gateway then
//! applies the plugin's `on_error` policy.
//!
//! # No WASI
//!
//! The gateway gives plugins no WASI at all (no clock, files, network,
//! environment or stdio) and refuses a component that imports any of it.
//! Rust's `std` on `wasm32-wasip2` imports WASI (stdio for panics, exit,
//! environment), so on wasm32 this SDK and plugins are `no_std` + `alloc`:
//! start a plugin crate with
//!
//! ```ignore
//! #![cfg_attr(target_arch = "wasm32", no_std)]
//! extern crate alloc;
//! ```
//!
//! and use `alloc::{string::String, vec::Vec, format!}`. The SDK provides
//! the global allocator (dlmalloc over the component's own linear memory)
//! and the panic handler. Natively (for `cargo test`) everything is `std`.
#![cfg_attr(target_arch = "wasm32", no_std)]

extern crate alloc;

use alloc::format;
use alloc::string::{String, ToString};

#[cfg(target_arch = "wasm32")]
#[global_allocator]
static ALLOCATOR: dlmalloc::GlobalDlmalloc = dlmalloc::GlobalDlmalloc;

// Without libc, nothing on wasm32-wasip2 provides `memcmp`/`bcmp` (memcpy
// and memset are bulk-memory instructions). Kept deliberately simple.
#[cfg(target_arch = "wasm32")]
#[no_mangle]
unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    let mut i = 0;
    while i < n {
        let (x, y) = (core::ptr::read_volatile(a.add(i)), core::ptr::read_volatile(b.add(i)));
        if x != y {
            return i32::from(x) - i32::from(y);
        }
        i += 1;
    }
    0
}

#[cfg(target_arch = "wasm32")]
#[no_mangle]
unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    memcmp(a, b, n)
}

/// The component model's allocation hook (what wit-bindgen's `realloc`
/// feature would provide; defined here so it survives `no_std` + LTO).
#[cfg(target_arch = "wasm32")]
#[no_mangle]
pub unsafe extern "C" fn cabi_realloc(old: *mut u8, old_len: usize, align: usize, new_len: usize) -> *mut u8 {
    use alloc::alloc::{alloc, realloc, Layout};
    let ptr = if old_len == 0 {
        if new_len == 0 {
            return align as *mut u8;
        }
        alloc(Layout::from_size_align_unchecked(new_len, align))
    } else {
        realloc(old, Layout::from_size_align_unchecked(old_len, align), new_len)
    };
    if ptr.is_null() {
        core::arch::wasm32::unreachable()
    }
    ptr
}

#[cfg(target_arch = "wasm32")]
#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    static mut PANICKING: bool = false;
    // SAFETY: a component instance is single-threaded.
    unsafe {
        if !PANICKING {
            PANICKING = true;
            let at = info.location().map(|l| format!(" at {}:{}", l.file(), l.line())).unwrap_or_default();
            log(Level::Error, &format!("panic: {}{at}", info.message()));
        }
    }
    core::arch::wasm32::unreachable()
}

#[doc(hidden)]
pub mod bindings {
    wit_bindgen::generate!({
        path: "../wit",
        world: "push-relay:filter/filter@0.1.0",
        pub_export_macro: true,
        export_macro_name: "__export_filter_world",
        default_bindings_module: "push_relay_plugin_sdk::bindings",
        additional_derives: [PartialEq, Eq],
    });
}

pub use bindings::push_relay::filter::host::Level;
pub use bindings::push_relay::filter::types::{Changes, Notification, Payload, PluginInfo, Urgency, Verdict};

/// The version of the WIT world (`push-relay:filter`) this SDK targets.
pub const WORLD_VERSION: &str = "0.1.0";

/// A filter plugin.
///
/// One value is created per warm instance by [`Filter::configure`]; the
/// gateway may run several instances of a plugin at once (one per worker
/// thread), so state kept in `self` is per instance. Use [`count`] for
/// counters that must be shared.
pub trait Filter: Sized + 'static {
    /// The plugin's name, e.g. `"keyword-filter"`.
    const NAME: &'static str;
    /// The plugin's version, usually `env!("CARGO_PKG_VERSION")`.
    const VERSION: &'static str;

    /// Builds the filter from the operator's `config` table, as JSON (`"{}"`
    /// when the operator gave none). An `Err` refuses the plugin: at start
    /// the gateway does not start, on reload the previous version stays.
    fn configure(config_json: &str) -> Result<Self, String>;

    /// Decides what happens to one notification.
    fn check(&mut self, notification: &Notification) -> Verdict;
}

/// Writes a line to the gateway's log (at most 1024 bytes are kept, and at
/// most 32 lines per call).
pub fn log(level: Level, message: &str) {
    #[cfg(target_arch = "wasm32")]
    bindings::push_relay::filter::host::log(level, message);
    #[cfg(not(target_arch = "wasm32"))]
    testing::record_log(level, message);
}

/// Counts one event under `key` for the sending instance and returns the
/// number of events counted under that key in the current window (this one
/// included). A window opens at the first event and lasts `window_seconds`
/// (1 to 86400).
pub fn count(key: &str, window_seconds: u32) -> u64 {
    #[cfg(target_arch = "wasm32")]
    return bindings::push_relay::filter::host::count(key, window_seconds);
    #[cfg(not(target_arch = "wasm32"))]
    return testing::count(key, window_seconds);
}

/// Native builds: routes panic messages to [`log`] too, so tests see them.
/// Called by [`export_filter!`] before `configure`.
#[doc(hidden)]
pub fn install_panic_hook() {
    #[cfg(not(target_arch = "wasm32"))]
    {
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| {
            let previous = std::panic::take_hook();
            std::panic::set_hook(Box::new(move |info| {
                let at = info.location().map(|l| format!(" at {}:{}", l.file(), l.line())).unwrap_or_default();
                let message = info
                    .payload()
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| info.payload().downcast_ref::<String>().cloned())
                    .unwrap_or_default();
                testing::record_log(Level::Error, &format!("panic: {message}{at}"));
                previous(info);
            }));
        });
    }
}

/// The configured filter of this instance (a component instance is
/// single-threaded; natively, one per test thread is fine since the export
/// shim is only driven by the gateway).
#[doc(hidden)]
pub struct Slot<F>(pub core::cell::RefCell<Option<F>>);
// SAFETY: wasm32 components are single-threaded; natively the export shim is never called.
unsafe impl<F> Sync for Slot<F> {}

/// Exports a [`Filter`] as the plugin's component exports. Use once per
/// plugin crate.
#[macro_export]
macro_rules! export_filter {
    ($filter:ty) => {
        const _: () = {
            struct __PushRelayFilterShim;

            static __FILTER: $crate::Slot<$filter> = $crate::Slot(::core::cell::RefCell::new(::core::option::Option::None));

            impl $crate::bindings::Guest for __PushRelayFilterShim {
                fn info() -> $crate::PluginInfo {
                    $crate::PluginInfo {
                        name: $crate::__to_string(<$filter as $crate::Filter>::NAME),
                        version: $crate::__to_string(<$filter as $crate::Filter>::VERSION),
                    }
                }

                fn configure(config_json: $crate::__String) -> ::core::result::Result<(), $crate::__String> {
                    $crate::install_panic_hook();
                    let filter = <$filter as $crate::Filter>::configure(&config_json)?;
                    *__FILTER.0.borrow_mut() = ::core::option::Option::Some(filter);
                    ::core::result::Result::Ok(())
                }

                fn check(notification: $crate::Notification) -> $crate::Verdict {
                    match __FILTER.0.borrow_mut().as_mut() {
                        ::core::option::Option::Some(filter) => $crate::Filter::check(filter, &notification),
                        ::core::option::Option::None => panic!("check called before configure"),
                    }
                }
            }

            $crate::bindings::__export_filter_world!(__PushRelayFilterShim with_types_in $crate::bindings);
        };
    };
}

#[doc(hidden)]
pub use alloc::string::String as __String;
#[doc(hidden)]
pub fn __to_string(s: &str) -> String {
    s.to_string()
}

/// Native test support: a notification builder, captured logs, and an
/// in-memory [`count`] with a clock tests can move.
#[cfg(not(target_arch = "wasm32"))]
pub mod testing {
    use std::cell::RefCell;
    use std::collections::HashMap;

    use super::{Level, Notification, Payload, Urgency};

    thread_local! {
        static LOGS: RefCell<Vec<(Level, String)>> = const { RefCell::new(Vec::new()) };
        static NOW: RefCell<u64> = const { RefCell::new(0) };
        static COUNTERS: RefCell<HashMap<String, (u64, u64)>> = RefCell::new(HashMap::new());
    }

    /// A notification as the gateway would send it: instance
    /// `mastodon.example`, provider `expo`, urgency normal, TTL one day,
    /// no payload.
    pub fn notification() -> Notification {
        Notification {
            instance: "mastodon.example".into(),
            registration: "reg-1".into(),
            provider: "expo".into(),
            urgency: Urgency::Normal,
            topic: None,
            ttl: 86_400,
            body_size: 512,
            payload: None,
        }
    }

    /// [`notification`] with a decrypted payload, as a plugin with
    /// `see_payload = true` sees it in decrypted mode.
    pub fn with_payload(title: &str, body: &str) -> Notification {
        Notification {
            payload: Some(Payload {
                title: title.into(),
                body: body.into(),
                account: Some("@alice@mastodon.example".into()),
                notification_type: "mention".into(),
            }),
            ..notification()
        }
    }

    /// The lines logged on this thread so far (and forgets them).
    pub fn logs() -> Vec<(Level, String)> {
        LOGS.with(|l| std::mem::take(&mut *l.borrow_mut()))
    }

    /// Moves the clock of the test [`count`](super::count) forward.
    pub fn advance(seconds: u64) {
        NOW.with(|n| *n.borrow_mut() += seconds);
    }

    /// Forgets every counter (and resets the clock).
    pub fn reset() {
        COUNTERS.with(|c| c.borrow_mut().clear());
        NOW.with(|n| *n.borrow_mut() = 0);
    }

    pub(crate) fn record_log(level: Level, message: &str) {
        eprintln!("[plugin {level:?}] {message}");
        LOGS.with(|l| l.borrow_mut().push((level, message.to_string())));
    }

    /// The gateway's semantics: a fixed window opening at the key's first event.
    pub(crate) fn count(key: &str, window_seconds: u32) -> u64 {
        let now = NOW.with(|n| *n.borrow());
        let window = u64::from(window_seconds.clamp(1, 86_400));
        COUNTERS.with(|c| {
            let mut c = c.borrow_mut();
            let entry = c.entry(key.to_string()).or_insert((now, 0));
            if now >= entry.0 + window {
                *entry = (now, 0);
            }
            entry.1 += 1;
            entry.1
        })
    }
}
