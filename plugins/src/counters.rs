//! The `count` import: fixed windows opening at a key's first event,
//! private to a plugin and an instance, bounded in size.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

const MAX_KEYS: usize = 100_000;
const MAX_KEY_BYTES: usize = 256;
const MAX_WINDOW_SECS: u32 = 86_400;

pub(crate) struct Counters {
    start: Instant,
    map: Mutex<HashMap<(String, String), Window>>,
}

#[derive(Clone, Copy)]
struct Window {
    opened_ms: u64,
    length_ms: u64,
    count: u64,
}

impl Counters {
    pub fn new() -> Counters {
        Counters { start: Instant::now(), map: Mutex::new(HashMap::new()) }
    }

    pub fn count(&self, instance: &str, key: &str, window_seconds: u32) -> u64 {
        let now = self.start.elapsed().as_millis() as u64;
        self.count_at(now, instance, key, window_seconds)
    }

    pub fn count_at(&self, now_ms: u64, instance: &str, key: &str, window_seconds: u32) -> u64 {
        let mut key = key;
        if key.len() > MAX_KEY_BYTES {
            let mut cut = MAX_KEY_BYTES;
            while !key.is_char_boundary(cut) {
                cut -= 1;
            }
            key = &key[..cut];
        }
        let length_ms = u64::from(window_seconds.clamp(1, MAX_WINDOW_SECS)) * 1000;
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        if map.len() >= MAX_KEYS && !map.contains_key(&(instance.to_owned(), key.to_owned())) {
            map.retain(|_, w| now_ms < w.opened_ms + w.length_ms);
            if map.len() >= MAX_KEYS {
                // Still full of live windows: forget them all rather than grow.
                tracing::warn!("plugin counters full ({MAX_KEYS} keys): resetting them");
                map.clear();
            }
        }
        let w = map
            .entry((instance.to_owned(), key.to_owned()))
            .or_insert(Window { opened_ms: now_ms, length_ms, count: 0 });
        if now_ms >= w.opened_ms + w.length_ms {
            *w = Window { opened_ms: now_ms, length_ms, count: 0 };
        }
        w.count += 1;
        w.count
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_are_per_instance_and_key() {
        let c = Counters::new();
        assert_eq!(c.count_at(0, "a.example", "k", 60), 1);
        assert_eq!(c.count_at(1000, "a.example", "k", 60), 2);
        assert_eq!(c.count_at(1000, "b.example", "k", 60), 1);
        assert_eq!(c.count_at(1000, "a.example", "other", 60), 1);
        assert_eq!(c.count_at(59_999, "a.example", "k", 60), 3);
        assert_eq!(c.count_at(60_000, "a.example", "k", 60), 1, "a new window");
    }
}
