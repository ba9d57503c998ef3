//! The `ringwire` binary: parse flags and config, start the shards, wait for a signal.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use ringwire::{Config, Server};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// ringwire — a real-time event gateway speaking the Pusher Channels protocol.
///
/// With no arguments it runs the embedded default config: 127.0.0.1:6001 with a demo app.
#[derive(Parser)]
#[command(version, about, long_about)]
struct Cli {
    /// TOML config file (see config/ringwire.default.toml for every key).
    #[arg(short, long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Validate the config and exit (0 valid, 2 invalid) without starting.
    #[arg(long)]
    check: bool,
    /// Print the embedded default config and exit.
    #[arg(long)]
    print_default_config: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Validate a config file and exit (0 valid, 2 invalid).
    CheckConfig {
        /// The file to check.
        file: PathBuf,
    },
    /// Check this host against the config: io_uring, limits, sysctls, CPUs, the data
    /// directory, TLS files, Redis. Each finding comes with its fix. Exit 0 all ok,
    /// 1 warnings, 2 problems.
    Doctor {
        /// The config to check against (default: the embedded default).
        #[arg(short, long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
}

fn load(path: Option<&PathBuf>) -> Result<Config, String> {
    match path {
        None => Ok(Config::embedded_default()),
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
            Config::from_toml(&text).map_err(|e| format!("{}: {e}", path.display()))
        }
    }
}

fn main() -> ExitCode {
    ringwire::server::abort_on_panic();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("RINGWIRE_LOG").unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    if cli.print_default_config {
        print!("{}", ringwire::config::DEFAULT_CONFIG_TOML);
        return ExitCode::SUCCESS;
    }
    let (path, check_only) = match &cli.command {
        Some(Command::CheckConfig { file }) => (Some(file), true),
        Some(Command::Doctor { config, json }) => {
            return ExitCode::from(ringwire::doctor::command(
                config.as_ref().or(cli.config.as_ref()).map(|p| p.as_path()),
                *json,
            ))
        }
        None => (cli.config.as_ref(), cli.check),
    };
    let config = match load(path) {
        Ok(config) => config,
        Err(message) => {
            eprintln!("ringwire: {message}");
            return ExitCode::from(2);
        }
    };
    // Certificates are read here too, so a bad file is reported (exit 2) before anything starts.
    if let Some(tls) = &config.tls {
        if let Err(message) = ringwire::net::tls::server_config(tls) {
            eprintln!("ringwire: {message}");
            return ExitCode::from(2);
        }
    }
    if check_only {
        println!(
            "config OK: {} app(s), {} shard(s), listening on {}",
            config.apps.len(),
            config.shard_count(),
            config.server.bind
        );
        return ExitCode::SUCCESS;
    }
    // Only the embedded default's demo credentials are public knowledge; a user's secret
    // must not end up in a terminal scrollback or a log collector's copy of stdout.
    let app_lines = app_lines(&config.apps, path.is_none());
    log_host_findings(&config, path.is_none());
    run(config, app_lines, path.cloned())
}

/// One startup line per app: id and key, and the secret only for the embedded default's demo
/// app (`show_secrets`), whose credentials are printed in the README anyway.
fn app_lines(apps: &[ringwire::config::AppConfig], show_secrets: bool) -> Vec<String> {
    apps.iter()
        .map(|app| match show_secrets {
            true => format!("  app id={} key={} secret={}", app.id, app.key, app.secret),
            false => format!("  app id={} key={}", app.id, app.key),
        })
        .collect()
}

/// Logs, once at start, what `ringwire doctor` would report as not ok, under the limits this
/// process really runs with (a systemd unit's differ from a login shell's). On the embedded
/// default config (a first try on a laptop, sized for production) problems are warnings: the
/// node runs, and an ERROR line is not what a newcomer's first start should print.
fn log_host_findings(config: &Config, embedded_default: bool) {
    let report = ringwire::doctor::diagnose(config, &ringwire::doctor::Host::gather(config));
    for finding in report.not_ok() {
        let fix = finding.fix.as_deref().unwrap_or("");
        match finding.verdict {
            ringwire::doctor::Verdict::Problem if !embedded_default => {
                tracing::error!(check = finding.check, fix, "{}", finding.message)
            }
            _ => tracing::warn!(check = finding.check, fix, "{}", finding.message),
        }
    }
}

/// SIGHUP: reads the config file again and applies what can change while running (the TLS
/// certificate, the apps and their webhook endpoints, and the live keys of `config::running_config`). A file that fails validation is refused whole, naming key and line, and
/// the running config stays.
fn reload(server: &Server, path: Option<&PathBuf>) {
    let Some(path) = path else {
        tracing::warn!("SIGHUP: running on the embedded default config; nothing to reload");
        return;
    };
    let outcome = match load(Some(path)) {
        Ok(config) => server.reload(&config),
        Err(message) => {
            server.reload_refused();
            Err(message)
        }
    };
    match outcome {
        Ok(reloaded) => {
            tracing::info!(
                certificates = reloaded.certificates,
                apps = reloaded.apps,
                apps_removed = ?reloaded.apps_removed,
                settings = reloaded.settings,
                "config reloaded from {}",
                path.display()
            );
            if !reloaded.needs_restart.is_empty() {
                tracing::warn!(
                    keys = ?reloaded.needs_restart,
                    "changed config keys take effect only after a restart"
                );
            }
        }
        Err(message) => tracing::error!("config reload refused, the running config stays: {message}"),
    }
}

fn run(config: Config, app_lines: Vec<String>, path: Option<PathBuf>) -> ExitCode {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let signals = match signal_hook::iterator::Signals::new([SIGTERM, SIGINT, SIGHUP]) {
        Ok(signals) => signals,
        Err(e) => {
            eprintln!("ringwire: cannot install signal handlers: {e}");
            return ExitCode::FAILURE;
        }
    };
    let server = match Server::start(config) {
        Ok(server) => server,
        Err(e) => {
            eprintln!("ringwire: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    let drivers: Vec<String> = server.drivers.iter().map(|d| format!("{d:?}")).collect();
    // The start-up lines go to whoever started the node; if they stopped reading (a closed
    // pipe), the node goes on serving: a failed write is not a reason to stop (println! would
    // panic, and a panic aborts the process).
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "ringwire listening on {} ({} shards: {})", server.addr, drivers.len(), drivers.join(", "));
    let _ = writeln!(
        out,
        "  WebSocket: ws://{}/app/{{key}}?protocol=7   HTTP API: http://{}/apps/{{id}}/events",
        server.addr, server.addr
    );
    for line in &app_lines {
        let _ = writeln!(out, "{line}");
    }
    if let Some(tls) = server.tls_addr {
        let _ =
            writeln!(out, "  TLS: wss://{tls}/app/{{key}}?protocol=7   HTTPS API: https://{tls}/apps/{{id}}/events");
    }
    drop(out);
    let mut signals = signals;
    for signal in signals.forever() {
        if signal == SIGHUP {
            reload(&server, path.as_ref());
            continue;
        }
        tracing::info!(signal, "shutting down: closing connections with 4200");
        break;
    }
    server.shutdown();
    server.join();
    ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The secret is printed for the embedded default's demo app only, never for a user config.
    #[test]
    fn secrets_printed_only_for_the_embedded_default() {
        let apps = Config::embedded_default().apps;
        assert_eq!(app_lines(&apps, true), ["  app id=1 key=ringwire-demo-key secret=ringwire-demo-secret"]);
        assert_eq!(app_lines(&apps, false), ["  app id=1 key=ringwire-demo-key"]);
    }
}
