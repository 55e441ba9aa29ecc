//! Telling the host's resolver about our servers: with systemd-resolved, per link
//! (`resolvectl dns/domain IFACE …`, what wg-quick's resolvconf shim does too); with a
//! `resolvconf` program, the way wg-quick does; otherwise say what to do by hand.

use std::net::IpAddr;
use std::path::Path;
use std::process::{Command, Stdio};

/// What manages the host's DNS configuration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// systemd-resolved: per-link servers and (routing) domains.
    Resolved,
    /// A `resolvconf` program (openresolv, Debian's resolvconf): global, not per domain.
    Resolvconf,
    None,
}

fn on_path(program: &str) -> bool {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path).any(|d| d.join(program).is_file())
}

/// systemd-resolved when it runs (its runtime directory) and `resolvectl` is there; else
/// `resolvconf` if installed.
pub fn detect() -> Backend {
    if Path::new("/run/systemd/resolve").is_dir() && on_path("resolvectl") {
        Backend::Resolved
    } else if on_path("resolvconf") {
        Backend::Resolvconf
    } else {
        Backend::None
    }
}

/// What to ask of systemd-resolved for link `iface`. `split`: only names under `domains`
/// go to `servers` (routing domains, `~zone`, not the default route). Otherwise the
/// wg-quick meaning of `DNS =`: every query goes there (`~.`), `domains` are search domains.
pub fn resolvectl_args(
    iface: &str,
    servers: &[IpAddr],
    domains: &[String],
    split: bool,
) -> Vec<Vec<String>> {
    let mut dns = vec!["dns".to_string(), iface.to_string()];
    dns.extend(servers.iter().map(ToString::to_string));
    let mut domain = vec!["domain".to_string(), iface.to_string()];
    if split {
        domain.extend(domains.iter().map(|d| format!("~{d}")));
    } else {
        domain.extend(domains.iter().cloned());
        domain.push("~.".into());
    }
    let default_route = vec![
        "default-route".to_string(),
        iface.to_string(),
        (if split { "false" } else { "true" }).to_string(),
    ];
    vec![dns, domain, default_route]
}

/// The `resolvconf` input for servers and search domains (as wg-quick writes it).
pub fn resolvconf_text(servers: &[IpAddr], search: &[String]) -> String {
    let mut s: String = servers
        .iter()
        .map(|a| format!("nameserver {a}\n"))
        .collect();
    if !search.is_empty() {
        s.push_str(&format!("search {}\n", search.join(" ")));
    }
    s
}

fn run(program: &str, args: &[String], stdin: Option<&str>) -> Result<(), String> {
    use std::io::Write as _;
    let mut child = Command::new(program)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("{program}: {e}"))?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(text.as_bytes())
            .map_err(|e| format!("{program}: {e}"))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| format!("{program}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        let err = String::from_utf8_lossy(&out.stderr);
        Err(format!("{program} {}: {}", args.join(" "), err.trim()))
    }
}

/// Split DNS for the overlay's zone (`canopy-agent join`): queries under `zone` go to our
/// resolver at `servers`, nothing else does. Returns what was done, for the log.
pub fn register_zone(iface: &str, servers: &[IpAddr], zone: &str) -> Result<String, String> {
    let shown: Vec<String> = servers.iter().map(ToString::to_string).collect();
    match detect() {
        Backend::Resolved => {
            for args in resolvectl_args(iface, servers, &[zone.to_string()], true) {
                run("resolvectl", &args, None)?;
            }
            Ok(format!(
                "systemd-resolved sends names under {zone} to {} on {iface}",
                shown.join(", ")
            ))
        }
        // resolvconf has no per-domain servers: adding ours would send every query to a
        // resolver that answers only the overlay's names.
        Backend::Resolvconf | Backend::None => Err(format!(
            "systemd-resolved is not running, so names under {zone} are not resolved system-wide: \
             ask {} directly (dig @{} NAME.{zone}), or forward the zone there from your resolver \
             (dnsmasq: server=/{zone}/{}; unbound: a forward-zone for {zone})",
            shown.join(" or "),
            shown.first().map_or("", String::as_str),
            shown.first().map_or("", String::as_str),
        )),
    }
}

/// wg-quick's `DNS =` (`canopy-agent up`): every query to `servers`, `search` domains added.
pub fn register_all(iface: &str, servers: &[IpAddr], search: &[String]) -> Result<String, String> {
    match detect() {
        Backend::Resolved => {
            for args in resolvectl_args(iface, servers, search, false) {
                run("resolvectl", &args, None)?;
            }
            Ok(format!("systemd-resolved uses the DNS servers of {iface}"))
        }
        Backend::Resolvconf => {
            let args = ["-a", &format!("tun.{iface}"), "-m", "0", "-x"].map(String::from);
            run("resolvconf", &args, Some(&resolvconf_text(servers, search)))?;
            Ok(format!("resolvconf uses the DNS servers of tun.{iface}"))
        }
        Backend::None => Err(format!(
            "neither systemd-resolved nor resolvconf is here, so DNS = was not applied: put \
             {} in /etc/resolv.conf yourself",
            resolvconf_text(servers, search).trim().replace('\n', "; ")
        )),
    }
}

/// Undoes [`register_all`] (a link that goes away takes its resolved settings with it).
pub fn unregister_all(iface: &str) {
    if detect() == Backend::Resolvconf {
        let args = ["-d", &format!("tun.{iface}"), "-f"].map(String::from);
        if let Err(e) = run("resolvconf", &args, None) {
            tracing::warn!(error = %e, "removing the DNS servers");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_dns_routes_only_the_zone_and_is_not_the_default_route() {
        let ips: Vec<IpAddr> = vec!["100.64.0.1".parse().unwrap(), "fd7a::1".parse().unwrap()];
        let a = resolvectl_args("canopy0", &ips, &["prod.canopy".into()], true);
        assert_eq!(a[0], ["dns", "canopy0", "100.64.0.1", "fd7a::1"]);
        assert_eq!(a[1], ["domain", "canopy0", "~prod.canopy"]);
        assert_eq!(a[2], ["default-route", "canopy0", "false"]);
    }

    #[test]
    fn wg_quick_dns_takes_every_query_and_searches_its_domains() {
        let ips: Vec<IpAddr> = vec!["10.0.0.53".parse().unwrap()];
        let a = resolvectl_args("wg0", &ips, &["corp.example".into()], false);
        assert_eq!(a[1], ["domain", "wg0", "corp.example", "~."]);
        assert_eq!(a[2], ["default-route", "wg0", "true"]);
        assert_eq!(
            resolvconf_text(&ips, &["corp.example".into(), "lab".into()]),
            "nameserver 10.0.0.53\nsearch corp.example lab\n"
        );
    }
}
