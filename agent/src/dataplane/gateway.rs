//! A site gateway: this node forwards the prefixes routed through it into its site. It turns
//! on IP forwarding for the families it carries, and installs an nftables table of its own
//! (removed when it stops being a gateway or exits) that forwards out of the tunnel only to
//! those prefixes (a peer cannot use it to reach anything else the host can), and, unless
//! told not to, masquerades overlay sources leaving through another interface (so the site
//! needs no route back to the overlay). Without masquerade the site's router needs a route to
//! the overlay's CIDRs via this host's LAN address.

use std::process::{Command, Stdio};

use ipnetwork::IpNetwork;

/// What this node set up as a gateway, so it can be undone.
#[derive(Debug, Default)]
pub(super) struct Gateway {
    /// The nftables table this node installed, if any, and the script it holds.
    table: Option<(String, String)>,
    /// Forwarding sysctls this node turned on, with the value they had.
    sysctls: Vec<(&'static str, String)>,
}

const FORWARD_V4: &str = "/proc/sys/net/ipv4/ip_forward";
const FORWARD_V6: &str = "/proc/sys/net/ipv6/conf/all/forwarding";

/// The nftables table name for interface `iface` (letters, digits and '_' only).
fn table_name(iface: &str) -> String {
    let safe: String = iface
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    format!("canopy_gw_{safe}")
}

/// The nftables script for a gateway on `iface` that forwards `prefixes`: out of the tunnel
/// only to them, masqueraded if `masquerade`. It replaces the table in one transaction.
fn gateway_script(table: &str, iface: &str, prefixes: &[IpNetwork], masquerade: bool) -> String {
    let out = format!("iifname \"{iface}\" oifname != \"{iface}\"");
    let mut forward = String::new();
    for (family, v4) in [("ip", true), ("ip6", false)] {
        let set: Vec<String> = prefixes
            .iter()
            .filter(|p| p.is_ipv4() == v4)
            .map(ToString::to_string)
            .collect();
        let rule = if set.is_empty() {
            let proto = if v4 { "ipv4" } else { "ipv6" };
            format!("    {out} meta nfproto {proto} drop\n")
        } else {
            format!(
                "    {out} {family} daddr != {{ {} }} drop\n",
                set.join(", ")
            )
        };
        forward.push_str(&rule);
    }
    let nat = if masquerade {
        format!(
            "  chain postrouting {{\n    type nat hook postrouting priority srcnat; policy accept;\n    {out} masquerade\n  }}\n"
        )
    } else {
        String::new()
    };
    format!(
        "add table inet {table}\ndelete table inet {table}\ntable inet {table} {{\n  chain forward {{\n    type filter hook forward priority filter; policy accept;\n{forward}  }}\n{nat}}}\n"
    )
}

fn nft(script: &str) -> std::io::Result<()> {
    use std::io::Write as _;
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(script.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    if out.status.success() {
        Ok(())
    } else {
        Err(std::io::Error::other(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ))
    }
}

impl Gateway {
    /// Makes this node forward `prefixes` (none: stop being a gateway).
    pub(super) fn set(
        &mut self,
        iface: &str,
        prefixes: &[IpNetwork],
        masquerade: bool,
    ) -> std::io::Result<()> {
        if prefixes.is_empty() {
            self.undo();
            return Ok(());
        }
        for (path, wanted) in [
            (FORWARD_V4, prefixes.iter().any(IpNetwork::is_ipv4)),
            (FORWARD_V6, prefixes.iter().any(IpNetwork::is_ipv6)),
        ] {
            if !wanted || self.sysctls.iter().any(|(p, _)| *p == path) {
                continue;
            }
            let old = std::fs::read_to_string(path)?.trim().to_string();
            if old != "1" {
                std::fs::write(path, "1")?;
                self.sysctls.push((path, old));
            }
        }
        // A table left by a crashed run is replaced as well.
        let table = table_name(iface);
        let script = gateway_script(&table, iface, prefixes, masquerade);
        if self.table.as_ref().is_none_or(|(_, s)| *s != script) {
            nft(&script)?;
            self.table = Some((table, script));
        }
        Ok(())
    }

    /// Removes the nftables table and puts the forwarding sysctls back.
    pub(super) fn undo(&mut self) {
        if let Some((t, _)) = self.table.take()
            && let Err(e) = nft(&format!("delete table inet {t}\n"))
        {
            tracing::warn!(table = %t, error = %e, "could not remove the gateway's nftables table");
        }
        for (path, old) in self.sysctls.drain(..) {
            let _ = std::fs::write(path, old);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_forwards_only_to_the_sites_prefixes_and_masquerades_only_what_leaves() {
        assert_eq!(table_name("canopy0"), "canopy_gw_canopy0");
        assert_eq!(table_name("wg-site.1"), "canopy_gw_wg_site_1");
        let prefixes: Vec<IpNetwork> = vec![
            "10.20.0.0/24".parse().unwrap(),
            "10.30.0.0/16".parse().unwrap(),
        ];
        let s = gateway_script("canopy_gw_canopy0", "canopy0", &prefixes, true);
        let out = "iifname \"canopy0\" oifname != \"canopy0\"";
        assert!(s.starts_with(
            "add table inet canopy_gw_canopy0\ndelete table inet canopy_gw_canopy0\n"
        ));
        assert!(s.contains(&format!(
            "{out} ip daddr != {{ 10.20.0.0/24, 10.30.0.0/16 }} drop"
        )));
        assert!(
            s.contains(&format!("{out} meta nfproto ipv6 drop")),
            "no IPv6 site: none forwarded"
        );
        assert!(s.contains("type nat hook postrouting priority srcnat"));
        assert!(s.contains(&format!("{out} masquerade")));
        let s = gateway_script("t", "canopy0", &prefixes, false);
        assert!(!s.contains("masquerade") && s.contains("hook forward"));
    }
}
