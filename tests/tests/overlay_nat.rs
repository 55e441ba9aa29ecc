//! NAT traversal: agents behind Linux MASQUERADE routers (namespaces), the controller and a
//! public peer on the lab bridge. Needs root and nft.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use canopy_tests::controller::*;
use canopy_tests::nat::behind_nat;
use canopy_tests::netns::Lab;

/// A peer behind a NAT learns its outside address (the router's, by STUN on its WireGuard
/// socket) and reports it; it and a public peer reach each other directly within 5 s.
#[test]
fn a_peer_behind_nat_reports_its_outside_address_and_reaches_a_public_peer_directly() {
    let lab = Lab::new();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("ctl");
    let con = controller(&lab, dir.path(), &data);
    con.ok(&["network", "create", "nat", "--cidr", "100.64.20.0/24"]);
    let join = || {
        con.ok(&["token", "create", "--network", "nat"])
            .trim()
            .to_string()
    };
    let router = lab.host(2);
    let inside = lab.host(3);
    behind_nat(&lab, &router, &inside, 1, "");
    let public = start_agent(&lab, dir.path(), &join(), "public", 1);
    let t = Instant::now();
    let natted = spawn_agent(&lab, dir.path(), &join(), "natted", inside.clone(), &[]);
    // Its endpoints as the controller has them: its own, and the router's outside address.
    let outside = format!("{}:", router.ip);
    wait_until("the NATed peer's outside address", || {
        let out = con.ok(&["peer", "list", "--network", "nat", "--json"]);
        out.contains(&outside)
    });
    println!(
        "outside address reported {:?} after the agent started",
        t.elapsed()
    );
    let (pa, na) = (
        addr(&status(&lab, &public.host.ns, &public.state).unwrap(), 0),
        addr(&status(&lab, &natted.host.ns, &natted.state).unwrap(), 0),
    );
    let t = Instant::now();
    assert!(
        lab.ping(&natted.host.ns, &pa, Duration::from_secs(5)),
        "inside → public"
    );
    assert!(
        lab.ping(&public.host.ns, &na, Duration::from_secs(5)),
        "public → inside"
    );
    println!("both ways within {:?}", t.elapsed());
    // Direct: the public peer hears the NATed one from the router's outside address.
    let eps = lab.wg(&public.host.ns, &public.iface, "endpoints");
    assert!(eps.contains(&outside), "{eps}");
}
