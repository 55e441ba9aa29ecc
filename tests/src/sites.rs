//! Sites behind gateways for the route tests: a site host on a veth behind a gateway host,
//! or on a bridge behind several gateways.

use std::path::Path;

use crate::controller::*;
use crate::netns::{Host, Lab};

/// Host `site` behind `gw`: a veth pair, the gateway at 10.20.0.1/24 and the site host at
/// 10.20.0.5/24, and with `return_route` the site's route back to the overlay via the gateway
/// (what a site router needs without masquerade).
pub fn site_behind(lab: &Lab, gw: &Host, site: &Host, return_route: Option<&str>) {
    site_behind_at(
        lab,
        gw,
        site,
        return_route,
        ("10.20.0.1/24", "10.20.0.5/24"),
    );
}

/// [`site_behind`] with other addresses for the gateway and the site host.
pub fn site_behind_at(
    lab: &Lab,
    gw: &Host,
    site: &Host,
    return_route: Option<&str>,
    (gw_addr, site_addr): (&str, &str),
) {
    let (a, b) = (format!("{}gs", lab.id), format!("{}sg", lab.id));
    let run = |ns: &str, cmd: &[&str]| lab.ok(ns, cmd);
    run(
        &gw.ns,
        &[
            "ip", "link", "add", &a, "type", "veth", "peer", "name", &b, "netns", &site.ns,
        ],
    );
    run(&gw.ns, &["ip", "addr", "add", gw_addr, "dev", &a, "nodad"]);
    run(&gw.ns, &["ip", "link", "set", &a, "up"]);
    run(
        &site.ns,
        &["ip", "addr", "add", site_addr, "dev", &b, "nodad"],
    );
    run(&site.ns, &["ip", "link", "set", &b, "up"]);
    if let Some(overlay) = return_route {
        let via = gw_addr.split('/').next().unwrap();
        run(&site.ns, &["ip", "route", "add", overlay, "via", via]);
    }
}

/// A controller, network "sites" (100.64.10.0/24), a client on host 1 and a gateway on host 2
/// (joined with `gw_flags`), seeing each other; the site host is host 3.
pub fn client_gateway_site<'a>(
    lab: &'a Lab,
    dir: &'a Path,
    data: &'a Path,
    gw_flags: &[&str],
) -> (Console<'a>, Node, Node, Host) {
    let con = controller(lab, dir, data);
    con.ok(&["network", "create", "sites", "--cidr", "100.64.10.0/24"]);
    let join = || {
        con.ok(&["token", "create", "--network", "sites"])
            .trim()
            .to_string()
    };
    let client = start_agent(lab, dir, &join(), "client", 1);
    let gw = start_agent_with(lab, dir, &join(), "gw", 2, gw_flags);
    for n in [&client, &gw] {
        wait_until("both agents to see each other", || {
            peers_seen(lab, n).is_some_and(|p| p.len() == 1)
        });
    }
    (con, client, gw, lab.host(3))
}

pub fn gateway_peer_id(lab: &Lab, gw: &Node) -> String {
    status(lab, &gw.host.ns, &gw.state).unwrap()["peer_id"]
        .as_str()
        .unwrap()
        .to_string()
}

/// Site host `site` on a bridge behind several gateways: `gateways[i]` gets address
/// `10.20.0.{i+1}/24` on a veth into the bridge, the site host 10.20.0.5/24 on the bridge.
pub fn site_behind_all(lab: &Lab, gateways: &[&Host], site: &Host) {
    let run = |ns: &str, cmd: &[&str]| lab.ok(ns, cmd);
    let br = format!("{}sb", lab.id);
    run(&site.ns, &["ip", "link", "add", &br, "type", "bridge"]);
    run(
        &site.ns,
        &["ip", "addr", "add", "10.20.0.5/24", "dev", &br, "nodad"],
    );
    run(&site.ns, &["ip", "link", "set", &br, "up"]);
    for (i, gw) in gateways.iter().enumerate() {
        let (a, b) = (format!("{}g{i}", lab.id), format!("{}s{i}", lab.id));
        run(
            &gw.ns,
            &[
                "ip", "link", "add", &a, "type", "veth", "peer", "name", &b, "netns", &site.ns,
            ],
        );
        let addr = format!("10.20.0.{}/24", i + 1);
        run(&gw.ns, &["ip", "addr", "add", &addr, "dev", &a, "nodad"]);
        run(&gw.ns, &["ip", "link", "set", &a, "up"]);
        run(&site.ns, &["ip", "link", "set", &b, "master", &br, "up"]);
    }
}
