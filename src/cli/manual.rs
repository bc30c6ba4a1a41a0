//! The man page and the shell completions, generated from the clap definitions in `cli.rs`
//! (clap_mangen, clap_complete), so that neither can drift from what the binary accepts.
//!
//! The man page is one page, policy-audit(1): the top-level sections, then a COMMANDS section
//! with one subsection per command (nested ones too, e.g. `deliveries retry`) holding its
//! synopsis and options, then what an administrator looks up: exit status, environment, files.

use super::{Cli, Output, Shell};
use clap::CommandFactory;
use clap_mangen::Man;
use clap_mangen::roff::{Roff, bold, roman};
use std::io;

/// `policy-audit completions <shell>`.
pub fn completions(shell: Shell) -> Output {
    let mut cmd = Cli::command();
    let name = cmd.get_name().to_string();
    let shell = match shell {
        Shell::Bash => clap_complete::Shell::Bash,
        Shell::Zsh => clap_complete::Shell::Zsh,
        Shell::Fish => clap_complete::Shell::Fish,
    };
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut cmd, &name, &mut script);
    let mut script = String::from_utf8_lossy(&script).into_owned();
    if shell == clap_complete::Shell::Bash {
        // clap_complete's bash script spells a hyphenated bin name one way in the loop that
        // finds the subcommand ("policy__audit__subcmd__events") and another in the case arms
        // ("policy__subcmd__audit__subcmd__events"), so no subcommand's options ever complete
        // (clap-rs/clap#6421). Spell the arms as the loop does; a no-op once upstream is fixed.
        let mangled = name.replace('-', "__");
        let wrong = name.replace('-', "__subcmd__");
        script = script.replace(&format!("{wrong}__subcmd__"), &format!("{mangled}__subcmd__"));
    }
    Output { stdout: script, ..Output::default() }
}

/// `policy-audit man`: the page in roff, for `man -l -` or /usr/share/man/man1/policy-audit.1.
pub fn man_page() -> Output {
    match render() {
        Ok(page) => Output { stdout: page, ..Output::default() },
        Err(e) => Output::unusable(format!("cannot render the man page: {e}")),
    }
}

fn render() -> io::Result<String> {
    let mut cmd = Cli::command();
    // Building sets each subcommand's bin name ("policy-audit reconcile") and its global options.
    cmd.build();
    let man = Man::new(cmd.clone());
    let mut page = Vec::new();
    man.render_title(&mut page)?;
    man.render_name_section(&mut page)?;
    man.render_synopsis_section(&mut page)?;
    description().to_writer(&mut page)?;
    man.render_options_section(&mut page)?;
    let mut heading = Roff::default();
    heading.control("SH", ["COMMANDS"]);
    heading.to_writer(&mut page)?;
    for sub in visible_subcommands(&cmd) {
        command_section(&mut page, sub)?;
    }
    reference().to_writer(&mut page)?;
    man.render_version_section(&mut page)?;
    Ok(String::from_utf8_lossy(&page).into_owned())
}

/// Commands a user can type: not hidden ones (`man`), not clap's own `help`.
fn visible_subcommands(cmd: &clap::Command) -> impl Iterator<Item = &clap::Command> {
    cmd.get_subcommands().filter(|sub| !sub.is_hide_set() && sub.get_name() != "help")
}

/// One command's subsection: its synopsis, description and options, then its own commands.
fn command_section(page: &mut Vec<u8>, cmd: &clap::Command) -> io::Result<()> {
    let name = cmd.get_bin_name().unwrap_or_else(|| cmd.get_name());
    let mut heading = Roff::default();
    heading.control("SS", [name]);
    heading.to_writer(page)?;

    // --config is a global option, described once at the top; not repeated for every command.
    let mut own = cmd.clone();
    if own.get_arguments().any(|arg| arg.get_id() == "config") {
        own = own.mut_arg("config", |arg| arg.hide(true));
    }
    let man = Man::new(own);
    let mut synopsis = Vec::new();
    man.render_synopsis_section(&mut synopsis)?;
    copy_without_headings(page, &synopsis);

    let mut about = Roff::default();
    about.control("PP", []);
    if let Some(text) = cmd.get_long_about().or_else(|| cmd.get_about()) {
        about.text([roman(text.to_string())]);
    }
    about.to_writer(page)?;

    let mut options = Vec::new();
    man.render_options_section(&mut options)?;
    copy_without_headings(page, &options);
    for sub in visible_subcommands(cmd) {
        command_section(page, sub)?;
    }
    Ok(())
}

/// Copies a rendered section of a page of its own; here it belongs to a subsection, so its
/// `.SH` heading goes.
fn copy_without_headings(page: &mut Vec<u8>, rendered: &[u8]) {
    for line in String::from_utf8_lossy(rendered).lines().filter(|line| !line.starts_with(".SH ")) {
        page.extend_from_slice(line.as_bytes());
        page.push(b'\n');
    }
}

fn description() -> Roff {
    let mut roff = Roff::default();
    roff.control("SH", ["DESCRIPTION"]);
    roff.text([roman(
        "policy-audit reads the git history of GitLab Security Policy Projects \
         (.gitlab/security-policies/policy.yml) and turns every change of a policy into a \
         GitLab audit event. It stores the events in a tamper-evident trail and streams them to \
         HTTP destinations such as a SIEM.",
    )]);
    roff.control("PP", []);
    roff.text([roman(
        "It runs as a daemon (policy-audit run, unit policy-audit.service) or one reconcile at a \
         time from a timer (policy-audit-reconcile.timer). While the daemon runs, the other \
         commands are answered by it through a control socket in the state directory.",
    )]);
    roff
}

/// Exit status, environment, files and where to read more.
fn reference() -> Roff {
    let mut roff = Roff::default();
    let item = |roff: &mut Roff, term: &str, text: &str| {
        roff.control("TP", []);
        roff.text([bold(term)]);
        roff.text([roman(text)]);
    };
    roff.control("SH", ["EXIT STATUS"]);
    item(&mut roff, "0", "Success.");
    item(&mut roff, "1", "Something the command covered failed (a project, a delivery, a broken chain).");
    item(&mut roff, "2", "Unusable input: bad arguments, an invalid config, a state directory in use.");
    roff.control("SH", ["ENVIRONMENT"]);
    item(&mut roff, "POLICY_AUDIT_CONFIG", "The config file when --config is not given.");
    item(&mut roff, "RUST_LOG", "Log filter; overrides log_level in the config.");
    item(&mut roff, "STATE_DIRECTORY", "Set by systemd; the state directory when the config has no state_dir.");
    roff.control("SH", ["FILES"]);
    item(&mut roff, "/etc/policy-audit/config.toml", "The config the systemd units use.");
    item(
        &mut roff,
        "/etc/default/policy-audit",
        "Secrets for the units (GITLAB_TOKEN=..., SIEM_TOKEN=...), as an environment file, mode 0600.",
    );
    item(
        &mut roff,
        "/var/lib/policy-audit",
        "The state: the database (db), the git mirrors (mirrors), and the daemon's control.sock.",
    );
    roff.control("SH", ["SEE ALSO"]);
    roff.text([roman(
        "/usr/share/doc/policy-audit/operations.md (operating it), configuration.md (every config \
         key), events.md (the events); systemctl(1), journalctl(1).",
    )]);
    roff
}
