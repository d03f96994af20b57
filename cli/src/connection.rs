//! How a party's command reaches the clean room: its Flight SQL address and
//! credentials, and a logged-in client.

use anyhow::Context;
use arrow_flight::sql::client::FlightSqlServiceClient;
use tonic::transport::Channel;

#[derive(clap::Args)]
pub struct Connection {
    /// The clean room's Flight SQL address.
    #[arg(long, default_value = "grpc://127.0.0.1:50051")]
    pub server: String,
    /// The party acting (for a study: the one charged).
    #[arg(long, env = "CLEANROOM_PARTY")]
    pub party: String,
    /// The party's password; read from this environment variable.
    #[arg(long, env = "CLEANROOM_PASSWORD", hide_env_values = true)]
    pub password: String,
}

impl Connection {
    /// A Flight SQL client logged in as the party.
    pub async fn client(&self) -> anyhow::Result<FlightSqlServiceClient<Channel>> {
        let endpoint = self
            .server
            .strip_prefix("grpc://")
            .map(|rest| format!("http://{rest}"))
            .ok_or_else(|| anyhow::anyhow!("--server must look like grpc://host:port"))?;
        let channel = Channel::from_shared(endpoint)?
            .connect()
            .await
            .with_context(|| format!("cannot reach the clean room at {}", self.server))?;
        let mut client = FlightSqlServiceClient::new(channel);
        client.handshake(&self.party, &self.password).await.map_err(|e| anyhow::anyhow!("cannot log in as {}: {e}", self.party))?;
        Ok(client)
    }
}
