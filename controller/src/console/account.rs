//! Account commands: a hosted tenant's sign-up, plan and usage, its API tokens, and the
//! provider's operator commands.

use anyhow::anyhow;
use canopy_proto::v1::hosted_service_client::HostedServiceClient;
use canopy_proto::v1::operator_service_client::OperatorServiceClient;
use canopy_proto::v1::*;
use clap::Subcommand;
use tonic::transport::Channel;

use canopy_proto::transport;

use super::{Bearer, ConnOpts, client, config_file, output, reply, resolve, server_of, trust_of};

#[derive(Subcommand, Debug)]
pub enum OperatorCmd {
    /// Every tenant with its plan and usage.
    Tenants,
    /// Refuse a tenant's console calls (its agents keep their last map).
    Suspend {
        tenant_id: String,
    },
    Resume {
        tenant_id: String,
    },
    /// Delete a tenant and everything it owns.
    Delete {
        tenant_id: String,
    },
    /// Give a tenant that locked itself out a new admin API token (shown once).
    TokenReset {
        tenant_id: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum ApiTokenCmd {
    /// Create an API token (shown once).
    Create {
        name: String,
        /// read (list and get only; the default) or admin (everything).
        #[arg(long, default_value = "read")]
        scope: String,
    },
    List,
    Revoke {
        token_id: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum TenantCmd {
    /// Create a tenant; prints its first API token (shown once).
    Signup {
        #[arg(long)]
        org: String,
        #[arg(long)]
        email: String,
        /// free, team or business.
        #[arg(long, default_value = "free")]
        plan: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum PlanCmd {
    /// Change to another plan (refused if what you have does not fit it).
    Set { plan: String },
}

type Hosted = HostedServiceClient<tonic::service::interceptor::InterceptedService<Channel, Bearer>>;

async fn hosted(conn: &ConnOpts) -> anyhow::Result<Hosted> {
    let r = resolve(conn)?;
    let channel = transport::connect(&r.server, &r.trust).await?;
    let bearer = format!("Bearer {}", r.token.trim())
        .parse()
        .map_err(|_| anyhow!("API token contains characters that cannot be sent"))?;
    Ok(HostedServiceClient::with_interceptor(
        channel,
        Bearer(bearer),
    ))
}

pub(super) async fn tenant(conn: &ConnOpts, json: bool, c: TenantCmd) -> anyhow::Result<()> {
    let TenantCmd::Signup { org, email, plan } = c;
    let file = config_file(conn)?;
    let server = server_of(conn, &file)?;
    let channel = transport::connect(&server, &trust_of(conn, &file)?).await?;
    let r = reply(
        HostedServiceClient::new(channel)
            .sign_up(SignUpRequest { org, email, plan })
            .await,
    )?;
    output::signed_up(json, &server, &r)
}

pub(super) async fn plan(conn: &ConnOpts, json: bool, set: Option<PlanCmd>) -> anyhow::Result<()> {
    let mut h = hosted(conn).await?;
    let sub = reply(match set {
        Some(PlanCmd::Set { plan }) => h.change_plan(ChangePlanRequest { plan }).await,
        None => h.get_subscription(GetSubscriptionRequest {}).await,
    })?;
    output::subscription(json, &sub)
}

pub(super) async fn usage(conn: &ConnOpts, json: bool) -> anyhow::Result<()> {
    let u = reply(hosted(conn).await?.get_usage(GetUsageRequest {}).await)?;
    output::usage(json, &u)
}

pub(super) async fn operator(conn: &ConnOpts, json: bool, c: OperatorCmd) -> anyhow::Result<()> {
    let file = config_file(conn)?;
    let server = server_of(conn, &file)?;
    let trust = trust_of(conn, &file)?;
    let token = std::env::var("CANOPY_OPERATOR_TOKEN")
        .map_err(|_| anyhow!("set CANOPY_OPERATOR_TOKEN to the operator credential"))?;
    let channel = transport::connect(&server, &trust).await?;
    let bearer = format!("Bearer {}", token.trim())
        .parse()
        .map_err(|_| anyhow!("operator credential contains characters that cannot be sent"))?;
    let mut op = OperatorServiceClient::with_interceptor(channel, Bearer(bearer));
    match c {
        OperatorCmd::Tenants => {
            let r = reply(op.list_tenants(ListTenantsRequest {}).await)?;
            output::tenants(json, &r.tenants)
        }
        OperatorCmd::Suspend { tenant_id } => {
            let s = reply(op.suspend_tenant(TenantRef { tenant_id }).await)?;
            output::subscription(json, &s)
        }
        OperatorCmd::Resume { tenant_id } => {
            let s = reply(op.resume_tenant(TenantRef { tenant_id }).await)?;
            output::subscription(json, &s)
        }
        OperatorCmd::TokenReset { tenant_id } => {
            let r = reply(op.reset_admin_token(TenantRef { tenant_id }).await)?;
            output::api_token_created(json, r.token.as_ref(), &r.secret)
        }
        OperatorCmd::Delete { tenant_id } => {
            let r = reply(
                op.delete_tenant(TenantRef {
                    tenant_id: tenant_id.clone(),
                })
                .await,
            )?;
            output::done(
                json,
                &format!(
                    "deleted tenant {tenant_id} ({} networks, {} peers)",
                    r.networks_deleted, r.peers_deleted
                ),
                serde_json::json!({"deleted": tenant_id, "networks": r.networks_deleted, "peers": r.peers_deleted}),
            )
        }
    }
}

pub(super) async fn apitoken(conn: &ConnOpts, json: bool, c: ApiTokenCmd) -> anyhow::Result<()> {
    let mut cl = client(conn).await?;
    match c {
        ApiTokenCmd::Create { name, scope } => {
            let r = reply(
                cl.create_api_token(CreateApiTokenRequest { name, scope })
                    .await,
            )?;
            output::api_token_created(json, r.token.as_ref(), &r.secret)
        }
        ApiTokenCmd::List => {
            let r = reply(cl.list_api_tokens(ListApiTokensRequest {}).await)?;
            output::api_tokens(json, &r.tokens)
        }
        ApiTokenCmd::Revoke { token_id } => {
            let t = reply(
                cl.revoke_api_token(RevokeApiTokenRequest { token_id })
                    .await,
            )?;
            output::api_tokens(json, &[t])
        }
    }
}
