//! `ringwire doctor`: the host checked against the config, each finding with its exact fix.
//!
//! Owns the verdicts, the report (text and JSON) and the exit status: 0 when every check is
//! ok, 1 with warnings, 2 with problems. `host` gathers the facts once from the machine;
//! `checks` judges them and never touches the host itself, so tests feed it controlled
//! facts. The binary runs the same checks at start and logs what is not ok once.

pub mod checks;
pub mod host;

#[cfg(test)]
mod tests;

use std::path::Path;

use serde::Serialize;

pub use host::Host;

use crate::config::Config;

/// How bad a finding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// Nothing to do.
    Ok,
    /// The server runs, but below what the config asks (fewer connections, epoll instead of
    /// io_uring, weaker durability) or at a risk the operator should know of.
    Warning,
    /// The server will not start, or will fail at what the config promises.
    Problem,
}

/// The outcome of one check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    /// Short stable name for scripts, e.g. `fd_limit`.
    pub check: &'static str,
    /// Its verdict.
    pub verdict: Verdict,
    /// What was found, with the numbers.
    pub message: String,
    /// The exact change that fixes it (sysctl line, systemd directive, `ulimit`, config key).
    pub fix: Option<String>,
}

impl Finding {
    /// A finding that needs nothing done.
    pub fn ok(check: &'static str, message: String) -> Finding {
        Finding { check, verdict: Verdict::Ok, message, fix: None }
    }

    /// A finding with a fix.
    pub fn with_fix(check: &'static str, verdict: Verdict, message: String, fix: String) -> Finding {
        Finding { check, verdict, message, fix: Some(fix) }
    }
}

/// Every finding of one run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Report {
    /// The worst verdict.
    pub verdict: Verdict,
    /// The process exit status this report maps to.
    pub exit_code: u8,
    /// One per check, in a fixed order.
    pub checks: Vec<Finding>,
}

impl Report {
    /// A report of `checks`.
    pub fn new(checks: Vec<Finding>) -> Report {
        let verdict = checks.iter().map(|f| f.verdict).max().unwrap_or(Verdict::Ok);
        let exit_code = match verdict {
            Verdict::Ok => 0,
            Verdict::Warning => 1,
            Verdict::Problem => 2,
        };
        Report { verdict, exit_code, checks }
    }

    /// The findings that are not ok.
    pub fn not_ok(&self) -> impl Iterator<Item = &Finding> {
        self.checks.iter().filter(|f| f.verdict != Verdict::Ok)
    }

    /// The human-readable report: one line per check, the fix indented under it.
    pub fn to_text(&self) -> String {
        let mut text = String::new();
        for finding in &self.checks {
            let label = match finding.verdict {
                Verdict::Ok => "ok",
                Verdict::Warning => "WARNING",
                Verdict::Problem => "PROBLEM",
            };
            text.push_str(&format!("{label:<8} {:<11} {}\n", finding.check, finding.message));
            if let Some(fix) = &finding.fix {
                text.push_str(&format!("{:<8} {:<11} fix: {fix}\n", "", ""));
            }
        }
        let count = |v: Verdict| self.checks.iter().filter(|f| f.verdict == v).count();
        text.push_str(&format!(
            "{} problem(s), {} warning(s): exit {}\n",
            count(Verdict::Problem),
            count(Verdict::Warning),
            self.exit_code
        ));
        text
    }
}

/// Runs every host check of `config` against `host`.
pub fn diagnose(config: &Config, host: &Host) -> Report {
    Report::new(checks::all(config, host))
}

/// `ringwire doctor [--config FILE] [--json]`: prints the report and returns the exit status.
/// An invalid config is a problem of its own, but the host is still checked against what the
/// file says (or the defaults where it cannot be read), so one run names everything.
pub fn command(path: Option<&Path>, json: bool) -> u8 {
    let (config, config_finding) = load(path);
    let host = Host::gather(&config);
    let mut findings = vec![config_finding];
    findings.extend(checks::all(&config, &host));
    let report = Report::new(findings);
    match json {
        true => println!("{}", serde_json::to_string_pretty(&report).expect("a report serializes")),
        false => print!("{}", report.to_text()),
    }
    report.exit_code
}

/// The config to check and the finding about the file itself.
fn load(path: Option<&Path>) -> (Config, Finding) {
    let Some(path) = path else {
        return (Config::embedded_default(), Finding::ok("config", "the embedded default config".into()));
    };
    let fix =
        format!("ringwire check-config {} names the key and line; see config/ringwire.default.toml", path.display());
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) => {
            let message = format!("cannot read {}: {e}; checking the defaults instead", path.display());
            return (Config::embedded_default(), Finding::with_fix("config", Verdict::Problem, message, fix));
        }
    };
    match Config::from_toml(&text) {
        Ok(config) => (config, Finding::ok("config", format!("{} is valid", path.display()))),
        Err(e) => {
            // The same types without the semantic checks, so the host checks still see the
            // file's values (a refused `cluster.redis_url` can still be tested for reachability).
            let config = toml::from_str::<Config>(&text).unwrap_or_else(|_| Config::embedded_default());
            let message = format!("{}: {e}", path.display());
            (config, Finding::with_fix("config", Verdict::Problem, message, fix))
        }
    }
}
