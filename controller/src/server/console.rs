//! `ConsoleService`: every call is authenticated by an API token and scoped to its tenant;
//! every change is written to the tenant's audit log.

use canopy_proto::v1::console_service_server::ConsoleService;
use canopy_proto::v1::*;
use tonic::{Request, Response, Status};

use crate::service::{Caller, Controller};

pub struct ConsoleApi {
    ctl: Controller,
}

impl ConsoleApi {
    pub fn new(ctl: Controller) -> Self {
        Self { ctl }
    }

    async fn caller<T>(&self, req: &Request<T>) -> Result<Caller, Status> {
        super::console_caller(&self.ctl, req).await
    }

    async fn audit(&self, c: &Caller, action: &str, object: &str, detail: &str) {
        self.ctl
            .audit(&c.tenant, &c.token_id, action, object, detail)
            .await;
    }
}

type R<T> = Result<Response<T>, Status>;

#[tonic::async_trait]
impl ConsoleService for ConsoleApi {
    async fn create_network(&self, req: Request<CreateNetworkRequest>) -> R<Network> {
        let c = self.caller(&req).await?;
        let r = req.into_inner();
        let n = self.ctl.create_network(&c, &r.name, &r.cidrs).await?;
        self.audit(
            &c,
            "network.create",
            &n.id,
            &format!("{} {}", n.name, n.cidrs.join(",")),
        )
        .await;
        Ok(Response::new(n))
    }

    async fn list_networks(&self, req: Request<ListNetworksRequest>) -> R<ListNetworksResponse> {
        let c = self.caller(&req).await?;
        Ok(Response::new(ListNetworksResponse {
            networks: self.ctl.list_networks(&c).await?,
        }))
    }

    async fn get_network(&self, req: Request<GetNetworkRequest>) -> R<Network> {
        let c = self.caller(&req).await?;
        Ok(Response::new(
            self.ctl.get_network(&c, &req.into_inner().network).await?,
        ))
    }

    async fn delete_network(&self, req: Request<DeleteNetworkRequest>) -> R<DeleteNetworkResponse> {
        let c = self.caller(&req).await?;
        let reference = req.into_inner().network;
        let id = self.ctl.resolve_network(&c, &reference).await?.0.id;
        let peers_removed = self.ctl.delete_network(&c, &id).await?;
        self.audit(
            &c,
            "network.delete",
            &id,
            &format!("{peers_removed} peers removed"),
        )
        .await;
        Ok(Response::new(DeleteNetworkResponse { peers_removed }))
    }

    async fn set_network_dns(&self, req: Request<SetNetworkDnsRequest>) -> R<Network> {
        let c = self.caller(&req).await?;
        let r = req.into_inner();
        let n = self.ctl.set_network_dns(&c, &r.network, &r.domain).await?;
        self.audit(&c, "network.set-dns", &n.id, &n.dns_domain)
            .await;
        Ok(Response::new(n))
    }

    async fn create_join_token(
        &self,
        req: Request<CreateJoinTokenRequest>,
    ) -> R<CreateJoinTokenResponse> {
        let c = self.caller(&req).await?;
        let r = req.into_inner();
        let (token, join_string) = self
            .ctl
            .create_join_token(&c, &r.network, r.max_uses, r.ttl_seconds, &r.tags)
            .await?;
        self.audit(
            &c,
            "token.create",
            &token.id,
            &format!("network {} max uses {}", token.network_id, token.max_uses),
        )
        .await;
        Ok(Response::new(CreateJoinTokenResponse {
            token: Some(token),
            join_string,
        }))
    }

    async fn list_join_tokens(
        &self,
        req: Request<ListJoinTokensRequest>,
    ) -> R<ListJoinTokensResponse> {
        let c = self.caller(&req).await?;
        let tokens = self
            .ctl
            .list_join_tokens(&c, &req.into_inner().network)
            .await?;
        Ok(Response::new(ListJoinTokensResponse { tokens }))
    }

    async fn revoke_join_token(&self, req: Request<RevokeJoinTokenRequest>) -> R<JoinToken> {
        let c = self.caller(&req).await?;
        let t = self
            .ctl
            .revoke_join_token(&c, &req.into_inner().token_id)
            .await?;
        self.audit(&c, "token.revoke", &t.id, "").await;
        Ok(Response::new(t))
    }

    async fn list_peers(&self, req: Request<ListPeersRequest>) -> R<ListPeersResponse> {
        let c = self.caller(&req).await?;
        let req = req.into_inner();
        let peers = self.ctl.list_peers(&c, &req.network, req.paths).await?;
        Ok(Response::new(ListPeersResponse { peers }))
    }

    async fn get_peer(&self, req: Request<GetPeerRequest>) -> R<Peer> {
        let c = self.caller(&req).await?;
        Ok(Response::new(
            self.ctl.get_peer(&c, &req.into_inner().peer_id).await?,
        ))
    }

    async fn remove_peer(&self, req: Request<RemovePeerRequest>) -> R<RemovePeerResponse> {
        let c = self.caller(&req).await?;
        let id = req.into_inner().peer_id;
        self.ctl.remove_peer(&c, &id).await?;
        self.audit(&c, "peer.remove", &id, "").await;
        Ok(Response::new(RemovePeerResponse {}))
    }

    async fn create_api_token(
        &self,
        req: Request<CreateApiTokenRequest>,
    ) -> R<CreateApiTokenResponse> {
        let c = self.caller(&req).await?;
        let r = req.into_inner();
        let (token, secret) = self.ctl.create_api_token_for(&c, &r.name, &r.scope).await?;
        self.audit(
            &c,
            "apitoken.create",
            &token.id,
            &format!("{} scope {}", token.name, token.scope),
        )
        .await;
        Ok(Response::new(CreateApiTokenResponse {
            token: Some(token),
            secret: secret.expose().to_string(),
        }))
    }

    async fn list_api_tokens(
        &self,
        req: Request<ListApiTokensRequest>,
    ) -> R<ListApiTokensResponse> {
        let c = self.caller(&req).await?;
        Ok(Response::new(ListApiTokensResponse {
            tokens: self.ctl.list_api_tokens(&c).await?,
        }))
    }

    async fn revoke_api_token(&self, req: Request<RevokeApiTokenRequest>) -> R<ApiToken> {
        let c = self.caller(&req).await?;
        let t = self
            .ctl
            .revoke_api_token(&c, &req.into_inner().token_id)
            .await?;
        self.audit(&c, "apitoken.revoke", &t.id, &t.name).await;
        Ok(Response::new(t))
    }

    async fn list_audit(&self, req: Request<ListAuditRequest>) -> R<ListAuditResponse> {
        let c = self.caller(&req).await?;
        let r = req.into_inner();
        Ok(Response::new(ListAuditResponse {
            entries: self
                .ctl
                .list_audit(&c, r.limit, &r.action, &r.object)
                .await?,
        }))
    }

    async fn advertise_route(&self, req: Request<AdvertiseRouteRequest>) -> R<Route> {
        let c = self.caller(&req).await?;
        let r = req.into_inner();
        let route = self.ctl.advertise_route(&c, &r.peer_id, &r.prefix).await?;
        let detail = format!("{} via {}", route.prefix, route.peer_id);
        self.audit(&c, "route.advertise", &route.id, &detail).await;
        Ok(Response::new(route))
    }

    async fn list_routes(&self, req: Request<ListRoutesRequest>) -> R<ListRoutesResponse> {
        let c = self.caller(&req).await?;
        let routes = self.ctl.list_routes(&c, &req.into_inner().network).await?;
        Ok(Response::new(ListRoutesResponse { routes }))
    }

    async fn set_exit_node(&self, req: Request<SetExitNodeRequest>) -> R<Peer> {
        let c = self.caller(&req).await?;
        let r = req.into_inner();
        let peer = self.ctl.set_exit_node(&c, &r.peer_id, &r.exit_node).await?;
        let detail = match peer.exit_node.as_str() {
            "" => "none".to_string(),
            e => format!("via {e}"),
        };
        self.audit(&c, "peer.exit_node", &peer.id, &detail).await;
        Ok(Response::new(peer))
    }

    async fn approve_route(&self, req: Request<ApproveRouteRequest>) -> R<Route> {
        let c = self.caller(&req).await?;
        let route = self
            .ctl
            .approve_route(&c, &req.into_inner().route_id)
            .await?;
        let detail = format!("{} via {}", route.prefix, route.peer_id);
        self.audit(&c, "route.approve", &route.id, &detail).await;
        Ok(Response::new(route))
    }

    async fn remove_route(&self, req: Request<RemoveRouteRequest>) -> R<Route> {
        let c = self.caller(&req).await?;
        let route = self
            .ctl
            .remove_route(&c, &req.into_inner().route_id)
            .await?;
        let detail = format!("{} via {}", route.prefix, route.peer_id);
        self.audit(&c, "route.remove", &route.id, &detail).await;
        Ok(Response::new(route))
    }

    async fn tag_peer(&self, req: Request<TagPeerRequest>) -> R<Peer> {
        let c = self.caller(&req).await?;
        let r = req.into_inner();
        let p = self.ctl.tag_peer(&c, &r.peer_id, &r.add, &r.remove).await?;
        let changes: Vec<String> = r
            .add
            .iter()
            .map(|t| format!("+{t}"))
            .chain(r.remove.iter().map(|t| format!("-{t}")))
            .collect();
        self.audit(&c, "peer.tag", &p.id, &changes.join(" ")).await;
        Ok(Response::new(p))
    }

    async fn get_policy(&self, req: Request<GetPolicyRequest>) -> R<Policy> {
        let c = self.caller(&req).await?;
        Ok(Response::new(
            self.ctl.get_policy(&c, &req.into_inner().network).await?,
        ))
    }

    async fn set_policy(&self, req: Request<SetPolicyRequest>) -> R<Policy> {
        let c = self.caller(&req).await?;
        let r = req.into_inner();
        let text = (!r.remove).then_some(r.text.as_str());
        let (p, diff) = self
            .ctl
            .set_policy(&c, &r.network, text, r.if_revision, r.lock.as_ref())
            .await?;
        let action = if r.remove {
            "policy.remove"
        } else {
            "policy.update"
        };
        self.audit(&c, action, &p.network_id, &diff).await;
        Ok(Response::new(p))
    }

    async fn test_policy(&self, req: Request<TestPolicyRequest>) -> R<TestPolicyResponse> {
        let c = self.caller(&req).await?;
        let r = req.into_inner();
        Ok(Response::new(
            self.ctl
                .test_policy(&c, &r.network, &r.from, &r.to, &r.proto, r.port)
                .await?,
        ))
    }

    async fn get_network_lock(&self, req: Request<GetNetworkLockRequest>) -> R<NetworkLock> {
        let c = self.caller(&req).await?;
        let r = req.into_inner();
        Ok(Response::new(
            self.ctl.get_network_lock(&c, &r.network).await?,
        ))
    }

    async fn set_lock_keys(&self, req: Request<SetLockKeysRequest>) -> R<NetworkLock> {
        let c = self.caller(&req).await?;
        let r = req.into_inner();
        let signed = r.key_set.unwrap_or_default();
        let l = self.ctl.set_lock_keys(&c, &r.network, &signed).await?;
        let detail = format!("key set {} ({} keys)", l.serial, l.keys.len());
        self.audit(&c, "network.lock-keys", &l.network_id, &detail)
            .await;
        Ok(Response::new(l))
    }

    async fn sign_lock(&self, req: Request<SignLockRequest>) -> R<SignLockResponse> {
        let c = self.caller(&req).await?;
        let r = req.into_inner();
        let out = self
            .ctl
            .sign_lock(&c, &r.network, &r.peers, &r.routes, r.policy.as_ref())
            .await?;
        let signed: Vec<&str> = r
            .peers
            .iter()
            .map(|p| p.peer_id.as_str())
            .chain(r.routes.iter().map(|x| x.route_id.as_str()))
            .collect();
        self.audit(&c, "network.lock-sign", &r.network, &signed.join(" "))
            .await;
        Ok(Response::new(out))
    }
}
