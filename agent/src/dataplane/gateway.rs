//! A site gateway: this node forwards the prefixes routed through it into its site. It turns
//! on IP forwarding for the families it carries and, unless told not to, masquerades overlay
//! sources leaving through another interface (so the site needs no route back to the
//! overlay), with an nftables table of its own that it removes when it stops being a gateway
//! or exits. Without masquerade the site's router needs a route to the overlay's CIDRs via
//! this host's LAN address.

use std::process::{Command, Stdio};

use ipnetwork::IpNetwork;

/// What this node set up as a gateway, so it can be undone.
#[derive(Debug, Default)]
pub(super) struct Gateway {
    /// The nftables table this node installed, if any.
    table: Option<String>,
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

/// The nftables script for a gateway on `iface`: masquerade what comes out of the tunnel and
/// leaves by another interface.
fn masquerade_script(table: &str, iface: &str) -> String {
    format!(
        "table inet {table} {{\n  chain postrouting {{\n    type nat hook postrouting priority srcnat; policy accept;\n    iifname \"{iface}\" oifname != \"{iface}\" masquerade\n  }}\n}}\n"
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
        if masquerade && self.table.is_none() {
            let table = table_name(iface);
            // A table left by a crashed run is replaced.
            let _ = nft(&format!("delete table inet {table}\n"));
            nft(&masquerade_script(&table, iface))?;
            self.table = Some(table);
        }
        Ok(())
    }

    /// Removes the nftables table and puts the forwarding sysctls back.
    pub(super) fn undo(&mut self) {
        if let Some(t) = self.table.take()
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
    fn the_masquerade_table_is_named_after_the_interface_and_masquerades_only_what_leaves() {
        assert_eq!(table_name("canopy0"), "canopy_gw_canopy0");
        assert_eq!(table_name("wg-site.1"), "canopy_gw_wg_site_1");
        let s = masquerade_script("canopy_gw_canopy0", "canopy0");
        assert!(s.contains("type nat hook postrouting priority srcnat"));
        assert!(s.contains("iifname \"canopy0\" oifname != \"canopy0\" masquerade"));
    }
}
