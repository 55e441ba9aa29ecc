//! `OperatorService`: the provider's view of tenants, authenticated by the operator credential.

use canopy_proto::v1::operator_service_server::OperatorService;
use canopy_proto::v1::*;
use tonic::{Request, Response, Status};

use crate::service::Controller;

pub struct OperatorApi {
    ctl: Controller,
}

impl OperatorApi {
    pub fn new(ctl: Controller) -> Self {
        Self { ctl }
    }
    fn check<T>(&self, req: &Request<T>) -> Result<(), Status> {
        let token = super::bearer(req)?;
        Ok(self.ctl.authenticate_operator(&token)?)
    }
}

type R<T> = Result<Response<T>, Status>;

#[tonic::async_trait]
impl OperatorService for OperatorApi {
    async fn list_tenants(&self, req: Request<ListTenantsRequest>) -> R<ListTenantsResponse> {
        self.check(&req)?;
        Ok(Response::new(ListTenantsResponse {
            tenants: self.ctl.list_tenants().await?,
        }))
    }
    async fn suspend_tenant(&self, req: Request<TenantRef>) -> R<Subscription> {
        self.check(&req)?;
        Ok(Response::new(
            self.ctl
                .set_suspended(&req.into_inner().tenant_id, true)
                .await?,
        ))
    }
    async fn resume_tenant(&self, req: Request<TenantRef>) -> R<Subscription> {
        self.check(&req)?;
        Ok(Response::new(
            self.ctl
                .set_suspended(&req.into_inner().tenant_id, false)
                .await?,
        ))
    }
    async fn delete_tenant(&self, req: Request<TenantRef>) -> R<DeleteTenantResponse> {
        self.check(&req)?;
        let (networks_deleted, peers_deleted) =
            self.ctl.delete_tenant(&req.into_inner().tenant_id).await?;
        Ok(Response::new(DeleteTenantResponse {
            networks_deleted,
            peers_deleted,
        }))
    }
    async fn reset_admin_token(&self, req: Request<TenantRef>) -> R<ResetAdminTokenResponse> {
        self.check(&req)?;
        let tenant = req.into_inner().tenant_id;
        let (token, secret) = self.ctl.reset_admin_token(&tenant).await?;
        self.ctl
            .audit(&tenant, "operator", "apitoken.reset", &token.id, "")
            .await;
        Ok(Response::new(ResetAdminTokenResponse {
            token: Some(token),
            secret: secret.expose().to_string(),
        }))
    }
}
