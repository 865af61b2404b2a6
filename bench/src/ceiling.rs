//! The machine's ceiling: ES256 (ECDSA P-256) verifications per second on
//! one core, from `openssl speed -seconds N ecdsap256`. Every push costs the
//! relay at least one such verification (VAPID), so `pushes/s ÷ (verify/s ×
//! cores)` says how close the relay gets to what the CPU could possibly do.

use anyhow::{bail, Context, Result};
use serde::Serialize;

#[derive(Clone, Debug, Serialize)]
pub struct Ceiling {
    pub sign_per_second: f64,
    pub verify_per_second: f64,
    pub openssl_version: String,
    pub command: String,
}

/// Run `openssl speed -seconds {secs} ecdsap256` and parse it.
pub fn openssl_speed(secs: u32) -> Result<Ceiling> {
    let command = format!("openssl speed -seconds {secs} ecdsap256");
    let out = std::process::Command::new("openssl")
        .args(["speed", "-seconds", &secs.to_string(), "ecdsap256"])
        .stdin(std::process::Stdio::null())
        .output()
        .context("run openssl speed (is the openssl command installed?)")?;
    if !out.status.success() {
        bail!("{command} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let (sign, verify) = parse_speed(&String::from_utf8_lossy(&out.stdout))?;
    let version = std::process::Command::new("openssl")
        .arg("version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    Ok(Ceiling { sign_per_second: sign, verify_per_second: verify, openssl_version: version, command })
}

/// Parse the table of `openssl speed ecdsap256`:
///
/// ```text
///                               sign    verify    sign/s verify/s
///  256 bits ecdsa (nistp256)   0.0000s   0.0001s  47224.2  15328.7
/// ```
///
/// The columns are located by the header (`sign/s`, `verify/s`), counted from
/// the end of the line, so leading words of any length do not matter.
pub fn parse_speed(text: &str) -> Result<(f64, f64)> {
    let lines: Vec<&str> = text.lines().collect();
    let header = lines
        .iter()
        .position(|l| l.split_whitespace().any(|w| w == "verify/s"))
        .context("no `verify/s` column in openssl speed output")?;
    let cols: Vec<&str> = lines[header].split_whitespace().collect();
    let from_end = |name: &str| cols.iter().position(|w| *w == name).map(|i| cols.len() - i);
    let verify_back = from_end("verify/s").unwrap();
    let sign_back = from_end("sign/s").context("no `sign/s` column")?;
    for l in &lines[header + 1..] {
        if !l.contains("nistp256") {
            continue;
        }
        let words: Vec<&str> = l.split_whitespace().collect();
        let at = |back: usize| -> Result<f64> {
            let w = words.get(words.len().checked_sub(back).context("short line")?).context("short line")?;
            w.parse::<f64>().with_context(|| format!("not a number: {w:?} in {l:?}"))
        };
        return Ok((at(sign_back)?, at(verify_back)?));
    }
    bail!("no nistp256 line in openssl speed output")
}

#[cfg(test)]
mod tests {
    #[test]
    fn parses_openssl3_table() {
        let t = "options: bn(64,64)\n                              sign    verify    sign/s verify/s\n 256 bits ecdsa (nistp256)   0.0000s   0.0001s  47224.2  15328.7\n";
        assert_eq!(super::parse_speed(t).unwrap(), (47224.2, 15328.7));
        assert!(super::parse_speed("garbage").is_err());
    }
}
