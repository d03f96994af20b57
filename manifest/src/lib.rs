//! The collaboration manifest: the one TOML file every party of a clean room
//! agrees on. It names the collaboration, the parties (with an argon2 PHC hash
//! of each party's password and its total ε and δ budgets), the datasets (who owns
//! them, where the Parquet files live, who may read them) and, per dataset
//! column, the role the column plays in DP queries.
//!
//! The manifest is public knowledge among the parties, so everything in it may
//! show up in error messages — except the password hashes, which `Debug` hides.
//!
//! How it maps to the planner's [`Policy`]: [`Manifest::policy_for`] takes the
//! datasets a party may read (it owns them or is listed in `readers`) and turns
//! each into a [`DatasetPolicy`]:
//! - `privacy_unit = "uid"` → `DatasetPolicy::privacy_unit = Some("uid")`,
//!   `public = true` → `None`;
//! - `role = "join_key"` → [`ColumnRole::JoinKey`];
//! - `role = "dimension"` with an optional `domain` (a list of strings →
//!   [`Domain::Strings`], `{ min, max }` → [`Domain::IntRange`],
//!   `{ from = "YYYY-MM-DD", to = "YYYY-MM-DD" }` → [`Domain::DateRange`])
//!   and an optional `groups_per_person` (how many of its values one person
//!   may have: a number, or `"all"` for the domain's size) →
//!   [`ColumnRole::Dimension`];
//! - a dataset's optional `max_contributions_per_group` (rows of one person
//!   in one group) → [`DatasetPolicy::max_contributions_per_group`];
//! - `role = "measure"` with `bounds = [lower, upper]` → [`ColumnRole::Measure`];
//! - `role = "hidden"` → [`ColumnRole::Hidden`] (undeclared columns are hidden
//!   too, by the planner's own rule).
//!
//! The `[defaults]` table becomes [`Defaults`]; each missing key falls back to
//! the planner's `Defaults::default()` value for that key.
//!
//! Loading validates everything that can be checked without touching the data
//! and reports every problem at once, each with its path in the file (for
//! example `datasets[1].columns.revenue.bounds`), so an operator fixes a
//! manifest in one round instead of one error per run. Whether the data files
//! exist is deliberately not checked here: the manifest is often written before
//! the data is in place.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};

use argon2::password_hash::{PasswordHash, PasswordVerifier};
use argon2::{Algorithm, Argon2, Params, Version};
use cleanroom_dp::policy::{ColumnRole, DatasetPolicy, Defaults, Domain, Policy};
use toml::{Table, Value};

/// A parsed and validated collaboration manifest.
#[derive(Debug, Clone, PartialEq)]
pub struct Manifest {
    pub collaboration: Collaboration,
    pub defaults: Defaults,
    pub parties: Vec<Party>,
    pub datasets: Vec<Dataset>,
    /// `[studies.<kind>]`: each study's default parameters (text, numbers
    /// and booleans as their text), for calls that leave them out.
    pub studies: BTreeMap<String, BTreeMap<String, String>>,
    /// How to reach S3 for `s3://` locations (`[s3]`); absent: from the
    /// environment (`AWS_ACCESS_KEY_ID`, `AWS_REGION`, `AWS_ENDPOINT_URL`, …).
    pub s3: Option<S3Settings>,
    /// The directory relative dataset locations are resolved against: the
    /// manifest file's directory, so a manifest works from any working
    /// directory.
    pub base_dir: PathBuf,
}

/// The `[s3]` table: the S3 (or S3-compatible) service of `s3://` dataset
/// locations. What it leaves out comes from the environment, as for the AWS
/// tools.
#[derive(Clone, PartialEq, Default)]
pub struct S3Settings {
    /// e.g. `http://127.0.0.1:9000` for a local S3-compatible server.
    pub endpoint: Option<String>,
    pub region: Option<String>,
    /// Allow a plain-HTTP endpoint.
    pub allow_http: bool,
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<String>,
}

impl fmt::Debug for S3Settings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("S3Settings")
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("allow_http", &self.allow_http)
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &self.secret_access_key.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

/// Where a dataset's files are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    /// A local directory (absolute once resolved).
    Local(PathBuf),
    /// `s3://bucket/prefix/`.
    S3 { bucket: String, prefix: String },
}

/// The `[collaboration]` table.
#[derive(Debug, Clone, PartialEq)]
pub struct Collaboration {
    pub name: String,
    /// A cap on the ε all parties together may spend. Parties may collude, so
    /// the people in the data lose privacy to all of them together; `None`
    /// means the sum of the party budgets.
    pub epsilon_cap: Option<f64>,
    /// The same for δ.
    pub delta_cap: Option<f64>,
    /// A query still running this long after its charge is stopped and
    /// fails with the same message whatever the data (its charge is kept).
    pub query_deadline: std::time::Duration,
    /// No answer to a DP query leaves sooner than this after the query
    /// starts: run times shorter than it cannot be told apart.
    pub min_response: std::time::Duration,
}

/// Default of `collaboration.query_deadline_seconds`.
pub const DEFAULT_QUERY_DEADLINE_SECONDS: f64 = 600.0;

/// One `[[parties]]` entry.
#[derive(Clone, PartialEq)]
pub struct Party {
    pub name: String,
    /// The argon2 password hash as a PHC string (`$argon2id$v=19$...`).
    pub password: String,
    /// The total ε this party may spend over the life of the collaboration.
    pub epsilon_budget: f64,
    /// The total δ it may spend (DP partition selection, Gaussian noise): 0
    /// unless set, so a party without one can run only pure ε-DP queries.
    pub delta_budget: f64,
}

// The hash is not the password, but it allows an offline guessing attack, so
// it is kept out of logs.
impl fmt::Debug for Party {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Party")
            .field("name", &self.name)
            .field("password", &"<redacted>")
            .field("epsilon_budget", &self.epsilon_budget)
            .field("delta_budget", &self.delta_budget)
            .finish()
    }
}

/// The storage format of a dataset's files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Parquet,
}

impl Format {
    pub fn as_str(self) -> &'static str {
        match self {
            Format::Parquet => "parquet",
        }
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One `[[datasets]]` entry.
#[derive(Debug, Clone, PartialEq)]
pub struct Dataset {
    /// The table name parties use in SQL.
    pub name: String,
    /// The party that contributed the data; it may always query it.
    pub owner: String,
    /// The location exactly as written in the manifest; see
    /// [`Dataset::local_path`] for the resolved directory.
    pub location: String,
    pub format: Format,
    /// The privacy-unit column of a protected dataset; `None` when public.
    pub privacy_unit: Option<String>,
    /// `true` for a public dataset (no privacy unit, no DP needed to read it).
    pub public: bool,
    /// Parties other than the owner allowed to query the dataset.
    pub readers: Vec<String>,
    pub columns: BTreeMap<String, Column>,
    /// How long rows are kept, by their event time.
    pub retention: Option<Retention>,
    /// The default bound on one person's rows in one group, for queries
    /// over this dataset that set none (`[defaults]`' value otherwise).
    pub max_contributions_per_group: Option<u32>,
}

/// `retention = { column = "ts", days = 90 }`: rows whose `column` (a date
/// or timestamp) is more than `days` days old are deleted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Retention {
    pub column: String,
    pub days: u32,
}

/// The role of a column, as written in the manifest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    JoinKey,
    Dimension,
    Measure,
    Hidden,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::JoinKey => "join_key",
            Role::Dimension => "dimension",
            Role::Measure => "measure",
            Role::Hidden => "hidden",
        }
    }

    fn parse(s: &str) -> Option<Role> {
        match s {
            "join_key" => Some(Role::JoinKey),
            "dimension" => Some(Role::Dimension),
            "measure" => Some(Role::Measure),
            "hidden" => Some(Role::Hidden),
            _ => None,
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One entry of a dataset's `columns` table.
#[derive(Debug, Clone, PartialEq)]
pub struct Column {
    pub role: Role,
    /// The public domain of a dimension, if it has one.
    pub domain: Option<Domain>,
    /// `[lower, upper]` clamping bounds; present exactly for measures.
    pub bounds: Option<[f64; 2]>,
    /// How many values of this dimension one person may have (`"all"` is
    /// stored as the domain's size): the default number of groups a person
    /// may contribute to when a query groups by it and sets no bound.
    pub groups_per_person: Option<u32>,
}

impl Column {
    /// The planner's view of this column.
    pub fn to_policy_role(&self) -> ColumnRole {
        match self.role {
            Role::JoinKey => ColumnRole::JoinKey,
            Role::Dimension => ColumnRole::Dimension {
                domain: self.domain.clone(),
                groups_per_person: self.groups_per_person,
            },
            Role::Measure => match self.bounds {
                Some([lower, upper]) => ColumnRole::Measure { lower, upper },
                // Validation makes bounds mandatory for measures; should a
                // hand-built `Column` lack them, fail closed rather than
                // aggregate an unbounded column.
                None => ColumnRole::Hidden,
            },
            Role::Hidden => ColumnRole::Hidden,
        }
    }
}

/// One thing wrong with a manifest, located by its path in the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Where: a key path such as `datasets[1].columns.revenue.bounds`, or
    /// `line L, column C` for a TOML syntax error.
    pub path: String,
    pub message: String,
}

impl Problem {
    fn new(path: impl Into<String>, message: impl Into<String>) -> Problem {
        Problem {
            path: path.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// Displays problems one per line.
struct ProblemLines<'a>(&'a [Problem]);

impl fmt::Display for ProblemLines<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, problem) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{problem}")?;
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("cannot read {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Every problem found in the manifest.
    #[error("{}", ProblemLines(.0))]
    Invalid(Vec<Problem>),
    /// A dataset location that cannot be turned into a local directory.
    #[error("dataset {dataset:?}: location {location:?}: {reason}")]
    Location {
        dataset: String,
        location: String,
        reason: String,
    },
}

/// The manifest's text and the (canonicalized) directory its relative
/// locations are resolved against.
fn read_with_base_dir(path: &Path) -> Result<(String, PathBuf), ManifestError> {
    let text = std::fs::read_to_string(path).map_err(|source| ManifestError::Io { path: path.to_path_buf(), source })?;
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let base_dir = parent.canonicalize().map_err(|source| ManifestError::Io { path: parent.to_path_buf(), source })?;
    Ok((text, base_dir))
}

impl Manifest {
    /// Reads, parses and validates the manifest at `path`. Relative dataset
    /// locations are resolved against the (canonicalized) directory of `path`.
    pub fn load(path: &Path) -> Result<Manifest, ManifestError> {
        let (text, base_dir) = read_with_base_dir(path)?;
        Manifest::from_str(&text, &base_dir)
    }

    /// Only what reaching the datasets needs — the `[s3]` settings and each
    /// dataset's location — for executors, which hold no party's password
    /// hash. The rest of the manifest is not checked here.
    pub fn load_storage(path: &Path) -> Result<(Option<S3Settings>, Vec<Location>), ManifestError> {
        let (text, base_dir) = read_with_base_dir(path)?;
        let root: Table = toml::from_str(&text).map_err(|e| ManifestError::Invalid(vec![syntax_problem(&text, &e)]))?;
        let mut c = Checker::default();
        let s3 = parse_s3(&mut c, &root);
        let mut locations = Vec::new();
        if let Some(Value::Array(entries)) = root.get("datasets") {
            for (i, entry) in entries.iter().enumerate() {
                let Some(Value::String(location)) = entry.get("location") else { continue };
                match parse_location(location) {
                    Ok(Location::Local(dir)) => locations.push(Location::Local(base_dir.join(dir))),
                    Ok(s3) => locations.push(s3),
                    Err(reason) => c.report(&format!("datasets[{i}].location"), reason),
                }
            }
        }
        if !c.problems.is_empty() {
            return Err(ManifestError::Invalid(c.problems));
        }
        Ok((s3, locations))
    }

    /// Parses and validates manifest text; `base_dir` plays the role of the
    /// manifest file's directory. On failure the error lists every problem.
    pub fn from_str(text: &str, base_dir: &Path) -> Result<Manifest, ManifestError> {
        let root: Table = match toml::from_str(text) {
            Ok(root) => root,
            Err(e) => return Err(ManifestError::Invalid(vec![syntax_problem(text, &e)])),
        };

        let mut c = Checker::default();
        c.unknown_keys(
            &root,
            "",
            &["collaboration", "defaults", "parties", "datasets", "s3", "studies"],
        );
        let s3 = parse_s3(&mut c, &root);
        let collaboration = parse_collaboration(&mut c, &root);
        let defaults = parse_defaults(&mut c, &root);
        let parties = parse_parties(&mut c, &root, base_dir);
        let datasets = parse_datasets(&mut c, &root, &defaults, &parties);
        let studies = parse_studies(&mut c, &root);

        if !c.problems.is_empty() {
            return Err(ManifestError::Invalid(c.problems));
        }
        Ok(Manifest {
            collaboration,
            defaults,
            parties,
            datasets,
            s3,
            studies,
            base_dir: std::path::absolute(base_dir).unwrap_or_else(|_| base_dir.to_path_buf()),
        })
    }

    /// Every problem with the manifest at `path`; empty when it is valid. An
    /// unreadable file is reported as a single problem located at the path.
    pub fn check(path: &Path) -> Vec<Problem> {
        match Manifest::load(path) {
            Ok(_) => Vec::new(),
            Err(ManifestError::Invalid(problems)) => problems,
            Err(ManifestError::Io { path, source }) => {
                vec![Problem::new(path.display().to_string(), source.to_string())]
            }
            Err(other) => vec![Problem::new(path.display().to_string(), other.to_string())],
        }
    }

    pub fn party(&self, name: &str) -> Option<&Party> {
        self.parties.iter().find(|p| p.name == name)
    }

    pub fn dataset(&self, name: &str) -> Option<&Dataset> {
        self.datasets.iter().find(|d| d.name == name)
    }

    /// Checks `password` against the party's PHC hash. An unknown party gets
    /// `false` after an argon2 computation of the same cost as a real
    /// verification, so response time does not reveal which party names exist.
    pub fn verify_password(&self, party: &str, password: &str) -> bool {
        match self.party(party) {
            Some(p) => match PasswordHash::new(&p.password) {
                // The verifier takes algorithm, version and cost parameters
                // from the hash itself and compares outputs in constant time.
                Ok(hash) => Argon2::default()
                    .verify_password(password.as_bytes(), &hash)
                    .is_ok(),
                Err(_) => false,
            },
            None => {
                self.hash_with_comparable_cost(password);
                false
            }
        }
    }

    /// Runs argon2 with the cost parameters of the first party's hash (or the
    /// argon2 defaults), which is what a real verification spends.
    fn hash_with_comparable_cost(&self, password: &str) {
        const DUMMY_SALT: &[u8] = b"cleanroom-unknown-party";
        let argon = self
            .parties
            .first()
            .and_then(|p| PasswordHash::new(&p.password).ok())
            .and_then(|hash| {
                let algorithm = Algorithm::try_from(hash.algorithm).ok()?;
                let version = match hash.version {
                    Some(v) => Version::try_from(v).ok()?,
                    None => Version::default(),
                };
                let params = Params::try_from(&hash).ok()?;
                Some(Argon2::new(algorithm, version, params))
            })
            .unwrap_or_default();
        let mut out = vec![
            0u8;
            argon
                .params()
                .output_len()
                .unwrap_or(Params::DEFAULT_OUTPUT_LEN)
        ];
        let _ = argon.hash_password_into(password.as_bytes(), DUMMY_SALT, &mut out);
        std::hint::black_box(&out);
    }

    /// The datasets `party` may query: those it owns or where it is a reader,
    /// in manifest order. Empty for an unknown party.
    pub fn readable_datasets(&self, party: &str) -> Vec<&Dataset> {
        self.datasets
            .iter()
            .filter(|d| d.readable_by(party))
            .collect()
    }

    /// The planner policy for `party`: its readable datasets and the defaults.
    /// Datasets it may not read are absent, so the planner treats them as
    /// nonexistent tables.
    pub fn policy_for(&self, party: &str) -> Policy {
        Policy {
            datasets: self
                .readable_datasets(party)
                .into_iter()
                .map(|d| (d.name.clone(), d.to_policy()))
                .collect(),
            defaults: self.defaults.clone(),
            studies: self.studies.clone(),
        }
    }
}

impl Dataset {
    /// Whether `party` may query this dataset.
    pub fn readable_by(&self, party: &str) -> bool {
        self.owner == party || self.readers.iter().any(|r| r == party)
    }

    /// The planner's view of this dataset.
    pub fn to_policy(&self) -> DatasetPolicy {
        DatasetPolicy {
            name: self.name.clone(),
            privacy_unit: self.privacy_unit.clone(),
            columns: self
                .columns
                .iter()
                .map(|(name, column)| (name.clone(), column.to_policy_role()))
                .collect(),
            max_contributions_per_group: self.max_contributions_per_group,
        }
    }

    /// Where the dataset's files are: a local directory (a relative path is
    /// resolved against `base_dir`, the manifest's directory; a `file://` URL
    /// is percent-decoded) or an `s3://bucket/prefix/` location.
    pub fn location(&self, base_dir: &Path) -> Result<Location, ManifestError> {
        let error = |reason: String| ManifestError::Location {
            dataset: self.name.clone(),
            location: self.location.clone(),
            reason,
        };
        let path = match parse_location(&self.location).map_err(error)? {
            Location::Local(path) => path,
            s3 => return Ok(s3),
        };
        let joined = if path.is_absolute() {
            path
        } else {
            base_dir.join(path)
        };
        // `absolute` anchors a relative base_dir at the working directory and
        // drops `.` components; rebuilding from components drops a trailing
        // slash, so `data/x/` and `data/x` give the same path.
        let absolute = std::path::absolute(&joined)
            .map_err(|e| error(format!("cannot make the path absolute: {e}")))?;
        Ok(Location::Local(absolute.components().collect()))
    }

    /// The dataset location as an absolute local directory path; an
    /// object-store location is an error.
    pub fn local_path(&self, base_dir: &Path) -> Result<PathBuf, ManifestError> {
        match self.location(base_dir)? {
            Location::Local(path) => Ok(path),
            Location::S3 { .. } => Err(ManifestError::Location {
                dataset: self.name.clone(),
                location: self.location.clone(),
                reason: "not a local directory".to_string(),
            }),
        }
    }
}

// ---------------------------------------------------------------------------
// Locations

/// URL schemes the engine is expected to read from later; named separately so
/// the message says "not yet" rather than "never".
const OBJECT_STORE_SCHEMES: &[&str] = &[
    "gs", "gcs", "az", "azure", "abfs", "abfss", "adl", "http", "https", "hdfs",
];

/// Turns a location into a local path (relative or absolute) or an S3
/// location, or says why it cannot be one.
fn parse_location(location: &str) -> Result<Location, String> {
    if location.trim().is_empty() {
        return Err("location must not be empty".to_string());
    }
    if let Some((scheme, rest)) = split_scheme(location) {
        let scheme = scheme.to_ascii_lowercase();
        return match scheme.as_str() {
            "file" => file_url_path(location, rest).map(Location::Local),
            "s3" => s3_location(rest),
            s if OBJECT_STORE_SCHEMES.contains(&s) => Err(format!(
                "{s}:// locations are not supported yet (use a local path, a file:// URL or s3://bucket/prefix/)"
            )),
            s => Err(format!(
                "unsupported URL scheme \"{s}\" (use a local path, a file:// URL or s3://bucket/prefix/)"
            )),
        };
    }
    // `file:/x` is a valid URL elsewhere but would silently become a relative
    // directory named `file:` here.
    if location
        .get(..5)
        .is_some_and(|p| p.eq_ignore_ascii_case("file:"))
    {
        return Err("a file URL must look like file:///absolute/path".to_string());
    }
    Ok(Location::Local(PathBuf::from(location)))
}

/// `bucket/prefix/` of an `s3://` URL.
fn s3_location(rest: &str) -> Result<Location, String> {
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    let valid_bucket = (3..=63).contains(&bucket.len())
        && bucket.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-');
    if !valid_bucket {
        return Err(format!("\"{bucket}\" is not an S3 bucket name (3 to 63 lower-case letters, digits, dots and hyphens)"));
    }
    if prefix.contains(['?', '#']) || prefix.split('/').any(|p| p == "." || p == "..") {
        return Err("an s3:// location is s3://bucket/prefix/, without a query, fragment, . or ..".to_string());
    }
    Ok(Location::S3 { bucket: bucket.to_string(), prefix: prefix.trim_matches('/').to_string() })
}

/// The optional `[s3]` table.
fn parse_s3(c: &mut Checker, root: &Table) -> Option<S3Settings> {
    let value = c.field(root, "", "s3", false)?;
    let table = c.table(value, "s3")?;
    c.unknown_keys(table, "s3", &["endpoint", "region", "allow_http", "access_key_id", "secret_access_key"]);
    let mut s3 = S3Settings {
        endpoint: c.optional_string(table, "s3", "endpoint"),
        region: c.optional_string(table, "s3", "region"),
        access_key_id: c.optional_string(table, "s3", "access_key_id"),
        secret_access_key: c.optional_string(table, "s3", "secret_access_key"),
        ..S3Settings::default()
    };
    if let Some(v) = c.field(table, "s3", "allow_http", false) {
        s3.allow_http = c.boolean(v, "s3.allow_http").unwrap_or(false);
    }
    if let Some(endpoint) = &s3.endpoint {
        if !(endpoint.starts_with("http://") || endpoint.starts_with("https://")) {
            c.report("s3.endpoint", format!("must be an http:// or https:// URL, found {endpoint:?}"));
        } else if endpoint.starts_with("http://") && !s3.allow_http {
            c.report("s3.endpoint", "is plain HTTP: set allow_http = true to use it (credentials and data travel unencrypted)");
        }
    }
    if s3.access_key_id.is_some() != s3.secret_access_key.is_some() {
        c.report("s3", "give both access_key_id and secret_access_key, or neither (then they come from the environment)");
    }
    Some(s3)
}

/// Splits `scheme://rest` when the part before `://` is a URL scheme.
fn split_scheme(location: &str) -> Option<(&str, &str)> {
    let (scheme, rest) = location.split_once("://")?;
    let mut chars = scheme.chars();
    let first = chars.next()?;
    let is_scheme = first.is_ascii_alphabetic()
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'));
    is_scheme.then_some((scheme, rest))
}

/// The path of a `file://` URL (`location`, whose scheme is `file`, and
/// `after_scheme` what follows its `file://`): an
/// absolute path on this machine, percent-decoded.
fn file_url_path(location: &str, after_scheme: &str) -> Result<PathBuf, String> {
    let url = url::Url::parse(location).map_err(|e| format!("not a file URL ({e}); use file:///absolute/path"))?;
    if url.query().is_some() || url.fragment().is_some() {
        return Err("a file URL may not have a query or fragment (write '?' as %3F and '#' as %23)".to_string());
    }
    if let Some(host) = url.host_str().filter(|h| !h.is_empty() && !h.eq_ignore_ascii_case("localhost")) {
        return Err(format!("file URLs with a host (\"{host}\") are not supported; use file:///absolute/path"));
    }
    if !after_scheme.contains('/') {
        return Err("the file URL has no path; use file:///absolute/path".to_string());
    }
    if url.path().split('/').any(|segment| segment.contains("%00")) {
        return Err("the file URL decodes to a path containing a NUL byte".to_string());
    }
    url.to_file_path().map_err(|()| "the file URL is not a path on this machine; use file:///absolute/path".to_string())
}

// ---------------------------------------------------------------------------
// Validation

/// Collects problems while walking the TOML tree. The walk is done by hand
/// rather than with serde so that a wrong type or an unknown key is one
/// problem among many instead of the end of the parse.
#[derive(Default)]
struct Checker {
    problems: Vec<Problem>,
}

impl Checker {
    fn report(&mut self, path: &str, message: impl Into<String>) {
        self.problems.push(Problem::new(path, message));
    }

    fn unknown_keys(&mut self, table: &Table, at: &str, allowed: &[&str]) {
        for key in table.keys() {
            if !allowed.contains(&key.as_str()) {
                self.report(
                    &join(at, key),
                    format!("unknown key (expected one of: {})", allowed.join(", ")),
                );
            }
        }
    }

    /// The value at `at.key`; reports it missing when `required`.
    fn field<'v>(
        &mut self,
        table: &'v Table,
        at: &str,
        key: &str,
        required: bool,
    ) -> Option<&'v Value> {
        let value = table.get(key);
        if value.is_none() && required {
            self.report(&join(at, key), "missing (this key is required)");
        }
        value
    }

    fn mismatch(&mut self, path: &str, expected: &str, found: &Value) {
        self.report(
            path,
            format!("expected {expected}, found {}", describe(found)),
        );
    }

    fn table<'v>(&mut self, value: &'v Value, path: &str) -> Option<&'v Table> {
        match value {
            Value::Table(t) => Some(t),
            other => {
                self.mismatch(path, "a table", other);
                None
            }
        }
    }

    fn array<'v>(&mut self, value: &'v Value, path: &str) -> Option<&'v Vec<Value>> {
        match value {
            Value::Array(a) => Some(a),
            other => {
                self.mismatch(path, "an array", other);
                None
            }
        }
    }

    fn string<'v>(&mut self, value: &'v Value, path: &str) -> Option<&'v str> {
        match value {
            Value::String(s) => Some(s),
            other => {
                self.mismatch(path, "a string", other);
                None
            }
        }
    }

    fn boolean(&mut self, value: &Value, path: &str) -> Option<bool> {
        match value {
            Value::Boolean(b) => Some(*b),
            other => {
                self.mismatch(path, "a boolean", other);
                None
            }
        }
    }

    fn integer(&mut self, value: &Value, path: &str) -> Option<i64> {
        match value {
            Value::Integer(i) => Some(*i),
            other => {
                self.mismatch(path, "an integer", other);
                None
            }
        }
    }

    /// A number; TOML integers are accepted so `bounds = [0, 100]` works.
    fn number(&mut self, value: &Value, path: &str) -> Option<f64> {
        match value {
            Value::Float(f) => Some(*f),
            Value::Integer(i) => Some(*i as f64),
            other => {
                self.mismatch(path, "a number", other);
                None
            }
        }
    }

    /// A required string at `at.key`.
    fn required_string(&mut self, table: &Table, at: &str, key: &str) -> Option<String> {
        let value = self.field(table, at, key, true)?;
        self.string(value, &join(at, key)).map(str::to_string)
    }

    /// An optional string at `at.key`; `None` when absent or mistyped.
    fn optional_string(&mut self, table: &Table, at: &str, key: &str) -> Option<String> {
        let value = self.field(table, at, key, false)?;
        self.string(value, &join(at, key)).map(str::to_string)
    }

    /// A positive integer that fits the target type, or `None` after a report.
    fn count<T: TryFrom<i64>>(&mut self, value: &Value, path: &str) -> Option<T> {
        let n = self.integer(value, path)?;
        if n < 1 {
            self.report(path, format!("must be at least 1, found {n}"));
            return None;
        }
        match T::try_from(n) {
            Ok(v) => Some(v),
            Err(_) => {
                self.report(path, format!("{n} is too large"));
                None
            }
        }
    }
}

fn describe(value: &Value) -> String {
    match value {
        Value::String(s) => format!("string {s:?}"),
        Value::Integer(i) => format!("integer {i}"),
        Value::Float(f) => format!("float {f}"),
        Value::Boolean(b) => format!("boolean {b}"),
        Value::Datetime(d) => format!("datetime {d}"),
        Value::Array(_) => "an array".to_string(),
        Value::Table(_) => "a table".to_string(),
    }
}

/// `at.key`, quoting the key when TOML would need quotes for it.
fn join(at: &str, key: &str) -> String {
    let bare = !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    let key = if bare {
        key.to_string()
    } else {
        format!("{key:?}")
    };
    if at.is_empty() {
        key
    } else {
        format!("{at}.{key}")
    }
}

/// A TOML syntax error, located by line and column.
fn syntax_problem(text: &str, error: &toml::de::Error) -> Problem {
    let message = error.message().trim().to_string();
    match error.span() {
        Some(span) => {
            let before = text.get(..span.start).unwrap_or(text);
            let line = before.matches('\n').count() + 1;
            let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
            Problem::new(format!("line {line}, column {column}"), message)
        }
        None => Problem::new("manifest", message),
    }
}

fn parse_collaboration(c: &mut Checker, root: &Table) -> Collaboration {
    let mut collaboration = Collaboration {
        name: String::new(),
        epsilon_cap: None,
        delta_cap: None,
        query_deadline: std::time::Duration::from_secs_f64(DEFAULT_QUERY_DEADLINE_SECONDS),
        min_response: std::time::Duration::ZERO,
    };
    let Some(value) = c.field(root, "", "collaboration", true) else {
        return collaboration;
    };
    let Some(table) = c.table(value, "collaboration") else {
        return collaboration;
    };
    c.unknown_keys(table, "collaboration", &["name", "epsilon_cap", "delta_cap", "query_deadline_seconds", "min_response_seconds"]);
    if let Some(name) = c.required_string(table, "collaboration", "name") {
        if name.trim().is_empty() {
            c.report("collaboration.name", "must not be empty");
        }
        collaboration.name = name;
    }
    if let Some(v) = c.field(table, "collaboration", "epsilon_cap", false) {
        if let Some(x) = c.number(v, "collaboration.epsilon_cap") {
            if !(x.is_finite() && x > 0.0) {
                c.report("collaboration.epsilon_cap", format!("must be a finite number above 0, found {x}"));
            }
            collaboration.epsilon_cap = Some(x);
        }
    }
    if let Some(v) = c.field(table, "collaboration", "delta_cap", false) {
        collaboration.delta_cap = delta_value(c, v, "collaboration.delta_cap");
    }
    let mut seconds = |key: &str, least: f64| -> Option<std::time::Duration> {
        let path = format!("collaboration.{key}");
        let value = c.field(table, "collaboration", key, false)?;
        let x = c.number(value, &path)?;
        if !(x.is_finite() && x >= least && x <= 86_400.0) {
            c.report(&path, format!("must be a number of seconds from {least} to 86400, found {x}"));
            return None;
        }
        Some(std::time::Duration::from_secs_f64(x))
    };
    if let Some(d) = seconds("query_deadline_seconds", 1.0) {
        collaboration.query_deadline = d;
    }
    if let Some(d) = seconds("min_response_seconds", 0.0) {
        collaboration.min_response = d;
    }
    if collaboration.min_response > collaboration.query_deadline {
        c.report("collaboration.min_response_seconds", "must not be above query_deadline_seconds");
    }
    collaboration
}

/// A δ: a number in [0, 1).
fn delta_value(c: &mut Checker, v: &Value, path: &str) -> Option<f64> {
    let x = c.number(v, path)?;
    if !(0.0..1.0).contains(&x) {
        c.report(path, format!("must be a number at least 0 and below 1, found {x}"));
        return None;
    }
    Some(x)
}

fn parse_defaults(c: &mut Checker, root: &Table) -> Defaults {
    const AT: &str = "defaults";
    let mut defaults = Defaults::default();
    let Some(value) = root.get(AT) else {
        return defaults;
    };
    let Some(table) = c.table(value, AT) else {
        return defaults;
    };
    c.unknown_keys(
        table,
        AT,
        &[
            "epsilon",
            "max_epsilon_per_query",
            "min_epsilon_per_query",
            "delta",
            "max_delta_per_query",
            "max_groups_contributed",
            "max_contributions_per_group",
            "max_output_groups",
            "max_rows_per_person",
        ],
    );

    // Each ε is `Some` only when present or defaulted *and* valid, so the
    // comparison between them below never piles a second complaint onto a
    // value that is already reported.
    let epsilon_value = |c: &mut Checker, key: &str, default: f64| -> Option<f64> {
        let path = join(AT, key);
        let Some(value) = table.get(key) else {
            return Some(default);
        };
        let x = c.number(value, &path)?;
        if !(x.is_finite() && x > 0.0) {
            c.report(&path, format!("must be a finite number above 0, found {x}"));
            return None;
        }
        Some(x)
    };
    let epsilon = epsilon_value(c, "epsilon", defaults.epsilon);
    let max_epsilon = epsilon_value(c, "max_epsilon_per_query", defaults.max_epsilon_per_query);
    if let (Some(e), Some(m)) = (epsilon, max_epsilon) {
        if e > m {
            c.report(
                &join(AT, "epsilon"),
                format!("epsilon {e} is above max_epsilon_per_query {m}"),
            );
        }
    }
    let min_epsilon = epsilon_value(c, "min_epsilon_per_query", defaults.min_epsilon_per_query);
    if let (Some(e), Some(m)) = (epsilon, min_epsilon) {
        if e < m {
            c.report(&join(AT, "epsilon"), format!("epsilon {e} is below min_epsilon_per_query {m}"));
        }
    }
    if let (Some(low), Some(high)) = (min_epsilon, max_epsilon) {
        if low > high {
            c.report(
                &join(AT, "min_epsilon_per_query"),
                format!("min_epsilon_per_query {low} is above max_epsilon_per_query {high}"),
            );
        }
    }
    defaults.epsilon = epsilon.unwrap_or(defaults.epsilon);
    defaults.max_epsilon_per_query = max_epsilon.unwrap_or(defaults.max_epsilon_per_query);
    defaults.min_epsilon_per_query = min_epsilon.unwrap_or(defaults.min_epsilon_per_query);
    let delta = table.get("delta").map(|v| delta_value(c, v, "defaults.delta"));
    let max_delta = table.get("max_delta_per_query").map(|v| delta_value(c, v, "defaults.max_delta_per_query"));
    if let Some(Some(m)) = max_delta {
        defaults.max_delta_per_query = m;
    }
    if let Some(Some(d)) = delta {
        if d > defaults.max_delta_per_query {
            c.report("defaults.delta", format!("delta {d} is above max_delta_per_query {}", defaults.max_delta_per_query));
        }
        defaults.delta = d;
    }

    if let Some(v) = table.get("max_groups_contributed") {
        if let Some(n) = c.count(v, "defaults.max_groups_contributed") {
            defaults.max_groups_contributed = n;
        }
    }
    if let Some(v) = table.get("max_contributions_per_group") {
        if let Some(n) = c.count(v, "defaults.max_contributions_per_group") {
            defaults.max_contributions_per_group = n;
        }
    }
    if let Some(v) = table.get("max_output_groups") {
        if let Some(n) = c.count(v, "defaults.max_output_groups") {
            defaults.max_output_groups = n;
        }
    }
    if let Some(v) = table.get("max_rows_per_person") {
        if let Some(n) = c.count(v, "defaults.max_rows_per_person") {
            defaults.max_rows_per_person = Some(n);
        }
    }
    defaults
}

fn parse_parties(c: &mut Checker, root: &Table, base_dir: &Path) -> Vec<Party> {
    const NONE: &str = "at least one [[parties]] entry is required";
    let mut parties = Vec::new();
    let Some(value) = root.get("parties") else {
        c.report("parties", NONE);
        return parties;
    };
    let Some(entries) = c.array(value, "parties") else {
        return parties;
    };
    if entries.is_empty() {
        c.report("parties", NONE);
    }
    let mut first_seen: HashMap<String, usize> = HashMap::new();
    for (i, entry) in entries.iter().enumerate() {
        let at = format!("parties[{i}]");
        let Some(table) = c.table(entry, &at) else {
            continue;
        };
        c.unknown_keys(table, &at, &["name", "password", "password_file", "epsilon_budget", "delta_budget"]);

        let name = c.required_string(table, &at, "name").unwrap_or_default();
        let name_path = join(&at, "name");
        if matches!(table.get("name"), Some(Value::String(_))) {
            if name.is_empty() {
                c.report(&name_path, "must not be empty");
            } else if !name
                .chars()
                .all(|ch| ch.is_ascii_alphanumeric() || ch == '_' || ch == '-')
            {
                c.report(
                    &name_path,
                    format!("party name {name:?} may only contain letters, digits, '_' and '-'"),
                );
            } else if let Some(first) = first_seen.get(&name) {
                c.report(
                    &name_path,
                    format!("duplicate party name {name:?} (first declared at parties[{first}])"),
                );
            } else {
                first_seen.insert(name.clone(), i);
            }
        }

        // The hash inline, or in a file (a mounted Secret on Kubernetes).
        let (password, password_at) = match (table.get("password"), table.get("password_file")) {
            (Some(_), Some(_)) => {
                c.report(&join(&at, "password_file"), "give either password or password_file, not both");
                (String::new(), None)
            }
            (None, Some(_)) => {
                let path_at = join(&at, "password_file");
                match c.required_string(table, &at, "password_file") {
                    Some(file) => match std::fs::read_to_string(base_dir.join(&file)) {
                        Ok(text) => (text.trim().to_string(), Some(path_at)),
                        Err(e) => {
                            c.report(&path_at, format!("cannot read {file}: {e}"));
                            (String::new(), None)
                        }
                    },
                    None => (String::new(), None),
                }
            }
            _ => {
                let password = c.required_string(table, &at, "password").unwrap_or_default();
                let valid = matches!(table.get("password"), Some(Value::String(_)));
                (password, valid.then(|| join(&at, "password")))
            }
        };
        if let Some(path) = password_at {
            if let Err(message) = check_phc(&password) {
                c.report(&path, message);
            }
        }

        let mut epsilon_budget = 0.0;
        if let Some(v) = c.field(table, &at, "epsilon_budget", true) {
            let path = join(&at, "epsilon_budget");
            if let Some(x) = c.number(v, &path) {
                if !(x.is_finite() && x > 0.0) {
                    c.report(&path, format!("must be a finite number above 0, found {x}"));
                }
                epsilon_budget = x;
            }
        }

        let delta_budget = match c.field(table, &at, "delta_budget", false) {
            Some(v) => delta_value(c, v, &join(&at, "delta_budget")).unwrap_or(0.0),
            None => 0.0,
        };

        parties.push(Party {
            name,
            password,
            epsilon_budget,
            delta_budget,
        });
    }
    parties
}

/// Checks that `phc` is a PHC string this crate can verify against: argon2,
/// a known version, valid cost parameters, a salt and a hash output. The
/// string itself never appears in a message.
fn check_phc(phc: &str) -> Result<(), String> {
    let hash = PasswordHash::new(phc).map_err(|e| format!("not a PHC password hash ({e})"))?;
    Algorithm::try_from(hash.algorithm).map_err(|_| {
        format!(
            "hash algorithm \"{}\" is not supported (use argon2id)",
            hash.algorithm
        )
    })?;
    if let Some(v) = hash.version {
        Version::try_from(v).map_err(|_| format!("unsupported argon2 version {v}"))?;
    }
    Params::try_from(&hash).map_err(|e| format!("invalid argon2 parameters ({e})"))?;
    if hash.salt.is_none() || hash.hash.is_none() {
        return Err("the PHC string has no salt or no hash output".to_string());
    }
    Ok(())
}

/// Dataset names are used unquoted in SQL, where DataFusion folds identifiers
/// to lowercase, so only lowercase identifiers name the table reliably.
fn is_sql_identifier(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_lowercase() || c == '_')
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

fn parse_datasets(
    c: &mut Checker,
    root: &Table,
    defaults: &Defaults,
    parties: &[Party],
) -> Vec<Dataset> {
    let mut datasets = Vec::new();
    // A manifest may list parties before any data is registered.
    let Some(value) = root.get("datasets") else {
        return datasets;
    };
    let Some(entries) = c.array(value, "datasets") else {
        return datasets;
    };
    // Parties whose names were reported as invalid still count as known here,
    // so one bad name does not cascade into "unknown party" everywhere.
    let known: HashSet<&str> = parties
        .iter()
        .map(|p| p.name.as_str())
        .filter(|n| !n.is_empty())
        .collect();
    let mut first_seen: HashMap<String, usize> = HashMap::new();

    for (i, entry) in entries.iter().enumerate() {
        let at = format!("datasets[{i}]");
        let Some(table) = c.table(entry, &at) else {
            continue;
        };
        c.unknown_keys(
            table,
            &at,
            &[
                "name",
                "owner",
                "location",
                "format",
                "privacy_unit",
                "public",
                "readers",
                "columns",
                "retention",
                "max_contributions_per_group",
            ],
        );

        let name = c.required_string(table, &at, "name").unwrap_or_default();
        if matches!(table.get("name"), Some(Value::String(_))) {
            let path = join(&at, "name");
            if !is_sql_identifier(&name) {
                c.report(
                    &path,
                    format!(
                        "dataset name {name:?} is not a valid SQL identifier (lowercase letters, digits and '_', not starting with a digit)"
                    ),
                );
            } else if let Some(first) = first_seen.get(&name) {
                c.report(
                    &path,
                    format!(
                        "duplicate dataset name {name:?} (first declared at datasets[{first}])"
                    ),
                );
            } else {
                first_seen.insert(name.clone(), i);
            }
        }

        let owner = c.required_string(table, &at, "owner").unwrap_or_default();
        if matches!(table.get("owner"), Some(Value::String(_))) && !known.contains(owner.as_str()) {
            c.report(&join(&at, "owner"), format!("unknown party {owner:?}"));
        }

        let location = c
            .required_string(table, &at, "location")
            .unwrap_or_default();
        if matches!(table.get("location"), Some(Value::String(_))) {
            if let Err(reason) = parse_location(&location) {
                c.report(&join(&at, "location"), reason);
            }
        }

        if let Some(format) = c.optional_string(table, &at, "format") {
            if format != Format::Parquet.as_str() {
                c.report(
                    &join(&at, "format"),
                    format!(
                        "unsupported format {format:?} (only \"parquet\" is supported for now)"
                    ),
                );
            }
        }

        let privacy_unit = c.optional_string(table, &at, "privacy_unit");
        let public = match table.get("public") {
            Some(v) => c.boolean(v, &join(&at, "public")).unwrap_or(false),
            None => false,
        };
        // Judged on the keys as written, so a mistyped value (already
        // reported) does not also trigger this.
        let has_unit = table.contains_key("privacy_unit");
        let says_public = matches!(table.get("public"), Some(Value::Boolean(true)));
        let public_mistyped = matches!(table.get("public"), Some(v) if !v.is_bool());
        if has_unit && says_public {
            c.report(
                &join(&at, "public"),
                "a dataset is either protected (privacy_unit) or public, not both",
            );
        } else if !has_unit && !says_public && !public_mistyped {
            c.report(
                &at,
                "declare either privacy_unit = \"<column>\" (a protected dataset) or public = true",
            );
        }

        let mut readers = Vec::new();
        if let Some(v) = table.get("readers") {
            let path = join(&at, "readers");
            if let Some(list) = c.array(v, &path) {
                for (j, reader) in list.iter().enumerate() {
                    let reader_path = format!("{path}[{j}]");
                    let Some(reader) = c.string(reader, &reader_path) else {
                        continue;
                    };
                    if !known.contains(reader) {
                        c.report(&reader_path, format!("unknown party {reader:?}"));
                    } else if readers.iter().any(|r| r == reader) {
                        c.report(&reader_path, format!("{reader:?} is listed twice"));
                    }
                    readers.push(reader.to_string());
                }
            }
        }

        let columns_at = join(&at, "columns");
        let mut columns = BTreeMap::new();
        // Columns whose role could be read, even if something else about them
        // is wrong: enough to judge the privacy-unit column.
        let mut roles: HashMap<String, Role> = HashMap::new();
        if let Some(v) = table.get("columns") {
            if let Some(column_table) = c.table(v, &columns_at) {
                for (column_name, column_value) in column_table {
                    let path = join(&columns_at, column_name);
                    if column_name.trim().is_empty() {
                        c.report(&path, "a column name must not be empty");
                    }
                    let (role, column) = parse_column(c, column_value, &path, defaults);
                    if let Some(role) = role {
                        roles.insert(column_name.clone(), role);
                    }
                    if let Some(column) = column {
                        columns.insert(column_name.clone(), column);
                    }
                }
            }
        }

        if let Some(unit) = &privacy_unit {
            let path = join(&at, "privacy_unit");
            let column_parsed = |name: &str| matches!(table.get("columns"), Some(Value::Table(t)) if t.contains_key(name));
            match roles.get(unit) {
                Some(Role::JoinKey) => {}
                Some(role) => c.report(
                    &path,
                    format!("column {unit:?} must have role \"join_key\", not \"{role}\""),
                ),
                // Declared but its role is unreadable: already reported.
                None if column_parsed(unit) => {}
                None => c.report(
                    &path,
                    format!(
                        "column {unit:?} is not declared in {columns_at} (it must be a join_key)"
                    ),
                ),
            }
        }

        let retention = parse_retention(c, table, &at);
        let per_group_path = join(&at, "max_contributions_per_group");
        let max_contributions_per_group = table.get("max_contributions_per_group").and_then(|v| c.count::<u32>(v, &per_group_path));
        if max_contributions_per_group.is_some_and(|m| m > cleanroom_dp::options::MAX_CONTRIBUTION_BOUND) {
            c.report(&per_group_path, format!("at most {} (beyond it the noise drowns every answer)", cleanroom_dp::options::MAX_CONTRIBUTION_BOUND));
        }
        if privacy_unit.is_none() && max_contributions_per_group.is_some() {
            c.report(&per_group_path, "only a protected dataset (one with a privacy_unit) has rows per person to bound");
        }

        datasets.push(Dataset {
            name,
            owner,
            location,
            format: Format::Parquet,
            public,
            privacy_unit,
            readers,
            columns,
            retention,
            max_contributions_per_group,
        });
    }
    datasets
}

/// `[studies.<kind>]` tables: a study's default parameters.
fn parse_studies(c: &mut Checker, root: &Table) -> BTreeMap<String, BTreeMap<String, String>> {
    let mut studies = BTreeMap::new();
    let Some(value) = root.get("studies") else { return studies };
    let Some(table) = c.table(value, "studies") else { return studies };
    for (kind, params) in table {
        let at = join("studies", kind);
        if !cleanroom_dp::studies::STUDIES.contains(&kind.as_str()) {
            c.report(&at, format!("unknown study (the studies are {})", cleanroom_dp::studies::STUDIES.join(", ")));
            continue;
        }
        let Some(params) = c.table(params, &at) else { continue };
        let mut out = BTreeMap::new();
        for (name, value) in params {
            let text = match value {
                Value::String(s) => s.clone(),
                Value::Integer(i) => i.to_string(),
                Value::Float(f) => f.to_string(),
                Value::Boolean(b) => b.to_string(),
                other => {
                    c.report(&join(&at, name), format!("expected a text, a number or a boolean, found {}", describe(other)));
                    continue;
                }
            };
            out.insert(name.clone(), text);
        }
        studies.insert(kind.clone(), out);
    }
    studies
}

/// `retention = { column = "...", days = N }` of a dataset.
fn parse_retention(c: &mut Checker, table: &Table, at: &str) -> Option<Retention> {
    let value = c.field(table, at, "retention", false)?;
    let path = join(at, "retention");
    let t = c.table(value, &path)?;
    c.unknown_keys(t, &path, &["column", "days"]);
    let column = c.required_string(t, &path, "column");
    let days = c.field(t, &path, "days", true).and_then(|v| c.count::<u32>(v, &join(&path, "days")));
    Some(Retention { column: column?, days: days? })
}

/// Parses one column entry. Returns its role when readable (for the
/// privacy-unit check) and the column when the role is readable; other
/// problems are reported but do not drop the column.
fn parse_column(
    c: &mut Checker,
    value: &Value,
    at: &str,
    defaults: &Defaults,
) -> (Option<Role>, Option<Column>) {
    let Some(table) = c.table(value, at) else {
        return (None, None);
    };
    c.unknown_keys(table, at, &["role", "domain", "bounds", "groups_per_person"]);

    let role = c.required_string(table, at, "role").and_then(|r| {
        let role = Role::parse(&r);
        if role.is_none() {
            c.report(
                &join(at, "role"),
                format!("unknown role {r:?} (expected join_key, dimension, measure or hidden)"),
            );
        }
        role
    });

    let mut domain = None;
    if let Some(v) = table.get("domain") {
        let path = join(at, "domain");
        match role {
            Some(Role::Dimension) => domain = parse_domain(c, v, &path, defaults),
            Some(other) => c.report(
                &path,
                format!("a domain is only allowed on dimension columns (this column is a {other})"),
            ),
            None => {}
        }
    }

    let mut bounds = None;
    let bounds_path = join(at, "bounds");
    match (table.get("bounds"), role) {
        (Some(v), Some(Role::Measure)) => bounds = parse_bounds(c, v, &bounds_path),
        (Some(_), Some(other)) => c.report(
            &bounds_path,
            format!("bounds are only allowed on measure columns (this column is a {other})"),
        ),
        (None, Some(Role::Measure)) => c.report(
            &bounds_path,
            "required for a measure column: bounds = [lower, upper]",
        ),
        _ => {}
    }

    // `groups_per_person`: a number, or "all" for the domain's size.
    let mut groups_per_person = None;
    if let Some(v) = table.get("groups_per_person") {
        let path = join(at, "groups_per_person");
        match (role, v) {
            (Some(Role::Dimension), Value::String(all)) if all == "all" => match &domain {
                Some(d) => groups_per_person = Some(u32::try_from(d.len()).unwrap_or(u32::MAX)),
                None if table.contains_key("domain") => {}
                None => c.report(&path, "\"all\" needs a domain to count (give a number instead)"),
            },
            (Some(Role::Dimension), Value::String(other)) => {
                c.report(&path, format!("expected a number or \"all\", found {other:?}"))
            }
            (Some(Role::Dimension), v) => groups_per_person = c.count::<u32>(v, &path),
            (Some(other), _) => c.report(
                &path,
                format!("groups_per_person is only allowed on dimension columns (this column is a {other})"),
            ),
            (None, _) => {}
        }
    }

    let column = role.map(|role| Column {
        role,
        domain,
        bounds,
        groups_per_person,
    });
    (role, column)
}

fn parse_domain(c: &mut Checker, value: &Value, at: &str, defaults: &Defaults) -> Option<Domain> {
    let cap = defaults.max_output_groups;
    match value {
        Value::Array(items) => {
            if items.is_empty() {
                c.report(at, "a domain list must not be empty");
                return None;
            }
            let mut values: Vec<String> = Vec::with_capacity(items.len());
            let mut ok = true;
            for (j, item) in items.iter().enumerate() {
                let path = format!("{at}[{j}]");
                match c.string(item, &path) {
                    Some(s) if values.iter().any(|v| v == s) => {
                        c.report(&path, format!("duplicate domain value {s:?}"));
                        ok = false;
                    }
                    Some(s) => values.push(s.to_string()),
                    None => ok = false,
                }
            }
            // The cap bounds the groups a public-domain GROUP BY enumerates,
            // whichever way the domain is written.
            if values.len() > cap {
                c.report(
                    at,
                    format!(
                        "{} values are more than defaults.max_output_groups = {cap}",
                        values.len()
                    ),
                );
                ok = false;
            }
            ok.then_some(Domain::Strings(values))
        }
        Value::Table(range) if range.contains_key("from") || range.contains_key("to") => {
            c.unknown_keys(range, at, &["from", "to"]);
            let mut day = |key: &str| -> Option<i32> {
                let path = join(at, key);
                let text = c.field(range, at, key, true).and_then(|v| c.string(v, &path))?.to_string();
                let parsed = cleanroom_dp::policy::parse_date(&text);
                if parsed.is_none() {
                    c.report(&path, format!("{text:?} is not a date (YYYY-MM-DD)"));
                }
                parsed
            };
            let (from, to) = (day("from"), day("to"));
            let (from, to) = (from?, to?);
            if from > to {
                c.report(at, "`from` is after `to`");
                return None;
            }
            let size = to as i64 - from as i64 + 1;
            if size > cap as i64 {
                c.report(at, format!("the date range has {size} days, more than defaults.max_output_groups = {cap}"));
                return None;
            }
            Some(Domain::DateRange { from, to })
        }
        Value::Table(range) => {
            c.unknown_keys(range, at, &["min", "max"]);
            let min = c
                .field(range, at, "min", true)
                .and_then(|v| c.integer(v, &join(at, "min")));
            let max = c
                .field(range, at, "max", true)
                .and_then(|v| c.integer(v, &join(at, "max")));
            let (min, max) = (min?, max?);
            if min > max {
                c.report(at, format!("min {min} is above max {max}"));
                return None;
            }
            // i128: the size of an i64 range can exceed i64.
            let size = max as i128 - min as i128 + 1;
            if size > cap as i128 {
                c.report(
                    at,
                    format!(
                        "the range {min}..={max} has {size} values, more than defaults.max_output_groups = {cap}"
                    ),
                );
                return None;
            }
            Some(Domain::IntRange { min, max })
        }
        other => {
            c.mismatch(at, "a list of strings, a table { min, max } or a table { from, to } of dates", other);
            None
        }
    }
}

fn parse_bounds(c: &mut Checker, value: &Value, at: &str) -> Option<[f64; 2]> {
    let items = c.array(value, at)?;
    if items.len() != 2 {
        c.report(
            at,
            format!("expected [lower, upper], found {} values", items.len()),
        );
        return None;
    }
    let lower = c.number(&items[0], &format!("{at}[0]"));
    let upper = c.number(&items[1], &format!("{at}[1]"));
    let (lower, upper) = (lower?, upper?);
    let mut ok = true;
    for (j, x) in [lower, upper].into_iter().enumerate() {
        if !x.is_finite() {
            c.report(
                &format!("{at}[{j}]"),
                format!("bound must be finite, found {x}"),
            );
            ok = false;
        }
    }
    if ok && lower > upper {
        c.report(
            at,
            format!("lower bound {lower} is above upper bound {upper}"),
        );
        ok = false;
    }
    ok.then_some([lower, upper])
}

/// The argon2id PHC hash of `password` with a random salt and argon2's
/// recommended cost: what a manifest's `password` (or `password_file`) holds.
pub fn hash_password(password: &str) -> String {
    use argon2::password_hash::{PasswordHasher, SaltString};
    let mut salt = [0u8; 16];
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut salt);
    let salt = SaltString::encode_b64(&salt).expect("16 bytes make a salt");
    argon2::Argon2::default().hash_password(password.as_bytes(), &salt).expect("argon2 hashes any password").to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use argon2::password_hash::{PasswordHasher, SaltString};

    /// A PHC hash with the smallest argon2 cost, so tests stay fast.
    fn phc(password: &str) -> String {
        let params = Params::new(Params::MIN_M_COST, 1, 1, None).unwrap();
        let salt = SaltString::encode_b64(b"cleanroom-tests!").unwrap();
        Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
            .hash_password(password.as_bytes(), &salt)
            .unwrap()
            .to_string()
    }

    fn sample() -> String {
        let advertiser = phc("adv-pw");
        let adnetwork = phc("net-pw");
        let auditor = phc("aud-pw");
        format!(
            r#"
[collaboration]
name = "adbench"

[defaults]
epsilon = 1.0
max_epsilon_per_query = 5.0
max_output_groups = 1000

[[parties]]
name = "advertiser"
password = "{advertiser}"
epsilon_budget = 50.0

[[parties]]
name = "adnetwork"
password = "{adnetwork}"
epsilon_budget = 20

[[parties]]
name = "auditor"
password = "{auditor}"
epsilon_budget = 1.5

[[datasets]]
name = "impressions"
owner = "adnetwork"
location = "data/impressions/"
format = "parquet"
privacy_unit = "uid"
readers = ["advertiser"]

[datasets.columns]
uid = {{ role = "join_key" }}
ts = {{ role = "hidden" }}
campaign_id = {{ role = "dimension", domain = {{ min = 1, max = 50 }} }}
channel = {{ role = "dimension", domain = ["display", "email", "search"] }}
is_return = {{ role = "dimension" }}
cost_micros = {{ role = "measure", bounds = [0, 20000] }}

[[datasets]]
name = "conversions"
owner = "advertiser"
location = "/srv/cleanroom/conversions"
privacy_unit = "uid"

[datasets.columns]
uid = {{ role = "join_key" }}
revenue = {{ role = "measure", bounds = [0.0, 500.5] }}

[[datasets]]
name = "campaigns"
owner = "adnetwork"
location = "file:///srv/cleanroom/campaigns%20v2/"
public = true
readers = ["advertiser", "auditor"]

[datasets.columns]
campaign_id = {{ role = "dimension" }}
"#
        )
    }

    fn problems(text: &str) -> Vec<Problem> {
        match Manifest::from_str(text, Path::new("/manifests")) {
            Ok(_) => panic!("expected the manifest to be rejected"),
            Err(ManifestError::Invalid(problems)) => problems,
            Err(other) => panic!("unexpected error: {other}"),
        }
    }

    fn has(problems: &[Problem], path: &str, fragment: &str) -> bool {
        problems
            .iter()
            .any(|p| p.path == path && p.message.contains(fragment))
    }

    #[track_caller]
    fn assert_has(problems: &[Problem], path: &str, fragment: &str) {
        assert!(
            has(problems, path, fragment),
            "no problem at {path} containing {fragment:?}; got:\n{}",
            ProblemLines(problems)
        );
    }

    /// Replaces exactly one occurrence, so a test cannot silently edit nothing.
    #[track_caller]
    fn edit(text: &str, from: &str, to: &str) -> String {
        assert_eq!(text.matches(from).count(), 1, "{from:?} must occur once");
        text.replacen(from, to, 1)
    }

    #[test]
    fn valid_manifest_loads_and_resolves_relative_locations() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("manifest.toml");
        std::fs::write(&path, sample()).unwrap();

        let manifest = Manifest::load(&path).unwrap();
        let base = dir.path().canonicalize().unwrap();
        assert_eq!(manifest.base_dir, base);
        assert_eq!(manifest.collaboration.name, "adbench");
        assert_eq!(manifest.parties.len(), 3);
        assert_eq!(manifest.party("adnetwork").unwrap().epsilon_budget, 20.0);
        assert_eq!(manifest.datasets.len(), 3);

        let impressions = manifest.dataset("impressions").unwrap();
        assert_eq!(impressions.location, "data/impressions/");
        assert_eq!(impressions.format, Format::Parquet);
        assert_eq!(
            impressions.local_path(&manifest.base_dir).unwrap(),
            base.join("data").join("impressions")
        );
        let conversions = manifest.dataset("conversions").unwrap();
        assert_eq!(
            conversions.local_path(&manifest.base_dir).unwrap(),
            PathBuf::from("/srv/cleanroom/conversions")
        );
        assert!(Manifest::check(&path).is_empty());
    }

    #[test]
    fn file_urls_without_a_path_or_with_a_query_or_nul_are_refused() {
        for (location, message) in [
            ("file://", "no path"),
            ("file:///srv/x?y=1", "query or fragment"),
            ("file:///srv/x#y", "query or fragment"),
            ("file:///srv/a%00b", "NUL byte"),
            ("file://host/srv", "with a host"),
        ] {
            let err = parse_location(location).unwrap_err();
            assert!(err.contains(message), "{location}: {err}");
        }
        assert_eq!(parse_location("FILE:///srv/%C3%A9t%C3%A9/").unwrap(), Location::Local(PathBuf::from("/srv/été")));
    }

    #[test]
    fn file_urls_are_percent_decoded() {
        let manifest = Manifest::from_str(&sample(), Path::new("/manifests")).unwrap();
        let campaigns = manifest.dataset("campaigns").unwrap();
        assert!(campaigns.public);
        assert_eq!(campaigns.privacy_unit, None);
        assert_eq!(
            campaigns.local_path(&manifest.base_dir).unwrap(),
            PathBuf::from("/srv/cleanroom/campaigns v2")
        );
    }

    #[test]
    fn columns_keep_their_roles_domains_and_bounds() {
        let manifest = Manifest::from_str(&sample(), Path::new("/manifests")).unwrap();
        let columns = &manifest.dataset("impressions").unwrap().columns;
        assert_eq!(columns["uid"].role, Role::JoinKey);
        assert_eq!(columns["ts"].role, Role::Hidden);
        assert_eq!(
            columns["campaign_id"].domain,
            Some(Domain::IntRange { min: 1, max: 50 })
        );
        assert_eq!(
            columns["channel"].domain,
            Some(Domain::Strings(vec![
                "display".into(),
                "email".into(),
                "search".into()
            ]))
        );
        assert_eq!(columns["is_return"].domain, None);
        assert_eq!(columns["cost_micros"].bounds, Some([0.0, 20000.0]));
    }

    #[test]
    fn missing_defaults_fall_back_to_the_planner_defaults() {
        let text = sample();
        let start = text.find("[defaults]").unwrap();
        let end = text.find("[[parties]]").unwrap();
        let without = format!("{}{}", &text[..start], &text[end..]);
        let manifest = Manifest::from_str(&without, Path::new("/m")).unwrap();
        assert_eq!(manifest.defaults, Defaults::default());

        let partial = Manifest::from_str(&sample(), Path::new("/m")).unwrap();
        assert_eq!(partial.defaults.max_epsilon_per_query, 5.0);
        assert_eq!(partial.defaults.max_output_groups, 1000);
        assert_eq!(
            partial.defaults.max_contributions_per_group,
            Defaults::default().max_contributions_per_group
        );
    }

    #[test]
    fn inverted_bounds_are_reported_with_their_path() {
        let text = edit(&sample(), "bounds = [0.0, 500.5]", "bounds = [10, 5]");
        let problems = problems(&text);
        assert_has(
            &problems,
            "datasets[1].columns.revenue.bounds",
            "lower bound 10 is above upper bound 5",
        );
        assert_eq!(
            problems[0].to_string(),
            "datasets[1].columns.revenue.bounds: lower bound 10 is above upper bound 5"
        );
    }

    #[test]
    fn every_problem_is_reported_not_just_the_first() {
        let mut text = sample();
        text = edit(&text, "epsilon_budget = 20\n", "epsilon_budget = -3\n");
        text = edit(&text, "owner = \"advertiser\"", "owner = \"nobody\"");
        text = edit(&text, "bounds = [0.0, 500.5]", "bounds = [10, 5]");
        text = edit(&text, "bounds = [0, 20000]", "bounds = [0, \"lots\"]");
        text = edit(&text, "format = \"parquet\"", "format = \"csv\"");
        text = edit(
            &text,
            "name = \"campaigns\"",
            "name = \"Campaigns\"\ncolour = \"blue\"",
        );
        let problems = problems(&text);
        assert_has(&problems, "parties[1].epsilon_budget", "above 0");
        assert_has(&problems, "datasets[1].owner", "unknown party \"nobody\"");
        assert_has(
            &problems,
            "datasets[1].columns.revenue.bounds",
            "lower bound 10",
        );
        assert_has(
            &problems,
            "datasets[0].columns.cost_micros.bounds[1]",
            "expected a number, found string \"lots\"",
        );
        assert_has(
            &problems,
            "datasets[0].format",
            "unsupported format \"csv\"",
        );
        assert_has(&problems, "datasets[2].name", "not a valid SQL identifier");
        assert_has(&problems, "datasets[2].colour", "unknown key");
        assert_eq!(problems.len(), 7, "{}", ProblemLines(&problems));
    }

    #[test]
    fn invalid_error_lists_one_problem_per_line() {
        let mut text = edit(&sample(), "owner = \"advertiser\"", "owner = \"x\"");
        text = edit(
            &text,
            "readers = [\"advertiser\"]",
            "readers = [\"advertiser\", \"y\"]",
        );
        let err = Manifest::from_str(&text, Path::new("/m")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "datasets[0].readers[1]: unknown party \"y\"\ndatasets[1].owner: unknown party \"x\""
        );
    }

    #[test]
    fn collaboration_cap_is_read_and_checked() {
        let text = sample().replacen("name = \"adbench\"", "name = \"adbench\"\nepsilon_cap = 80.0", 1);
        let m = Manifest::from_str(&text, Path::new("/data")).unwrap();
        assert_eq!(m.collaboration.epsilon_cap, Some(80.0));
        let bad = sample().replacen("name = \"adbench\"", "name = \"adbench\"\nepsilon_cap = -1", 1);
        let ManifestError::Invalid(problems) = Manifest::from_str(&bad, Path::new("/data")).unwrap_err() else {
            panic!("expected problems")
        };
        assert!(problems.iter().any(|p| p.path == "collaboration.epsilon_cap"), "{problems:?}");
    }

    #[test]
    fn unknown_owner_is_reported() {
        let text = edit(&sample(), "owner = \"advertiser\"", "owner = \"x\"");
        assert_has(&problems(&text), "datasets[1].owner", "unknown party \"x\"");
    }

    #[test]
    fn unknown_and_repeated_readers_are_reported() {
        let text = edit(
            &sample(),
            "readers = [\"advertiser\", \"auditor\"]",
            "readers = [\"advertiser\", \"ghost\", \"advertiser\"]",
        );
        let problems = problems(&text);
        assert_has(
            &problems,
            "datasets[2].readers[1]",
            "unknown party \"ghost\"",
        );
        assert_has(&problems, "datasets[2].readers[2]", "listed twice");
    }

    #[test]
    fn policy_only_contains_readable_datasets() {
        let manifest = Manifest::from_str(&sample(), Path::new("/m")).unwrap();

        let names = |party: &str| -> Vec<String> {
            manifest.policy_for(party).datasets.into_keys().collect()
        };
        assert_eq!(
            names("advertiser"),
            ["campaigns", "conversions", "impressions"]
        );
        assert_eq!(names("adnetwork"), ["campaigns", "impressions"]);
        assert_eq!(names("auditor"), ["campaigns"]);
        assert!(names("stranger").is_empty());

        let readable: Vec<&str> = manifest
            .readable_datasets("adnetwork")
            .iter()
            .map(|d| d.name.as_str())
            .collect();
        assert_eq!(readable, ["impressions", "campaigns"]);
    }

    #[test]
    fn policy_maps_roles_domains_bounds_and_defaults() {
        let manifest = Manifest::from_str(&sample(), Path::new("/m")).unwrap();
        let policy = manifest.policy_for("adnetwork");
        assert_eq!(policy.defaults, manifest.defaults);

        let impressions = policy.dataset("impressions").unwrap();
        assert_eq!(impressions.privacy_unit.as_deref(), Some("uid"));
        assert_eq!(impressions.role("uid"), ColumnRole::JoinKey);
        assert_eq!(impressions.role("ts"), ColumnRole::Hidden);
        assert_eq!(
            impressions.role("campaign_id"),
            ColumnRole::Dimension {
                domain: Some(Domain::IntRange { min: 1, max: 50 }),
                groups_per_person: None,
            }
        );
        assert_eq!(
            impressions.role("is_return"),
            ColumnRole::Dimension { domain: None, groups_per_person: None }
        );
        assert_eq!(
            impressions.role("cost_micros"),
            ColumnRole::Measure {
                lower: 0.0,
                upper: 20000.0
            }
        );
        assert_eq!(policy.dataset("campaigns").unwrap().privacy_unit, None);
    }

    #[test]
    fn right_password_is_accepted() {
        let manifest = Manifest::from_str(&sample(), Path::new("/m")).unwrap();
        assert!(manifest.verify_password("advertiser", "adv-pw"));
        assert!(manifest.verify_password("adnetwork", "net-pw"));
    }

    #[test]
    fn executors_read_only_the_storage_parts() {
        let dir = tempfile::tempdir().unwrap();
        // password_file names a file that does not exist here: executors never read it.
        let text = sample().replacen(&format!("password = \"{}\"", phc("net-pw")), "password_file = \"/nonexistent/adnetwork\"", 1)
            + "\n[s3]\nendpoint = \"http://127.0.0.1:9000\"\nallow_http = true\n";
        let path = dir.path().join("manifest.toml");
        std::fs::write(&path, text.replacen("location = \"", "location = \"s3://bucket/", 1)).unwrap();
        let (s3, locations) = Manifest::load_storage(&path).unwrap();
        assert_eq!(s3.unwrap().endpoint.as_deref(), Some("http://127.0.0.1:9000"));
        assert!(locations.iter().any(|l| matches!(l, Location::S3 { bucket, .. } if bucket == "bucket")), "{locations:?}");
        assert!(Manifest::load(&path).is_err(), "the full manifest needs the password file");
    }

    #[test]
    fn hashed_passwords_verify() {
        let hash = hash_password("s3cret pass");
        assert!(check_phc(&hash).is_ok());
        let text = sample().replacen(&phc("net-pw"), &hash, 1);
        let manifest = Manifest::from_str(&text, Path::new("/m")).unwrap();
        assert!(manifest.verify_password("adnetwork", "s3cret pass"));
        assert!(!manifest.verify_password("adnetwork", "net-pw"));
    }

    #[test]
    fn a_password_hash_may_live_in_a_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("adnetwork"), format!("{}\n", phc("net-pw"))).unwrap();
        let text = sample().replacen(&format!("password = \"{}\"", phc("net-pw")), "password_file = \"adnetwork\"", 1);
        assert!(text.contains("password_file"));
        let manifest = Manifest::from_str(&text, dir.path()).unwrap();
        assert!(manifest.verify_password("adnetwork", "net-pw"));
        let missing = Manifest::from_str(&text, Path::new("/nonexistent")).unwrap_err().to_string();
        assert!(missing.contains("password_file") && missing.contains("cannot read adnetwork"), "{missing}");
        let both = text.replacen("password_file = \"adnetwork\"", &format!("password_file = \"adnetwork\"\npassword = \"{}\"", phc("x")), 1);
        let error = Manifest::from_str(&both, dir.path()).unwrap_err().to_string();
        assert!(error.contains("either password or password_file"), "{error}");
    }

    #[test]
    fn wrong_password_is_refused() {
        let manifest = Manifest::from_str(&sample(), Path::new("/m")).unwrap();
        assert!(!manifest.verify_password("advertiser", "net-pw"));
        assert!(!manifest.verify_password("advertiser", ""));
    }

    #[test]
    fn unknown_party_is_refused() {
        let manifest = Manifest::from_str(&sample(), Path::new("/m")).unwrap();
        assert!(!manifest.verify_password("stranger", "adv-pw"));
    }

    #[test]
    fn party_debug_output_hides_the_password_hash() {
        let manifest = Manifest::from_str(&sample(), Path::new("/m")).unwrap();
        let party = manifest.party("advertiser").unwrap();
        let debug = format!("{party:?}");
        assert!(!debug.contains(&party.password));
        assert!(debug.contains("<redacted>"));
    }

    #[test]
    fn bad_password_hashes_are_reported() {
        let scrypt = "$scrypt$ln=16,r=8,p=1$aM15713r3Xsvxbi31lqr1Q$nFNh2CVHVjNldFVKDHDlm4CbdRSCdEBsjjJxD+iCs5E";
        let mut text = sample();
        let advertiser_hash = manifest_hash(&text, 0);
        let auditor_hash = manifest_hash(&text, 2);
        text = edit(&text, &advertiser_hash, "hunter2");
        text = edit(&text, &auditor_hash, scrypt);
        let problems = problems(&text);
        assert_has(
            &problems,
            "parties[0].password",
            "not a PHC password hash (",
        );
        assert_has(
            &problems,
            "parties[2].password",
            "\"scrypt\" is not supported",
        );
        assert!(problems.iter().all(|p| !p.message.contains("hunter2")));
    }

    fn manifest_hash(text: &str, index: usize) -> String {
        let m = Manifest::from_str(text, Path::new("/m")).unwrap();
        m.parties[index].password.clone()
    }

    #[test]
    fn party_names_budgets_and_count_are_checked() {
        let mut text = edit(&sample(), "name = \"auditor\"", "name = \"advertiser\"");
        text = edit(&text, "name = \"adnetwork\"", "name = \"ad network\"");
        text = edit(&text, "epsilon_budget = 1.5", "epsilon_budget = inf");
        text = edit(
            &text,
            "owner = \"adnetwork\"\nlocation = \"data",
            "owner = \"ad network\"\nlocation = \"data",
        );
        let problems = problems(&text);
        assert_has(
            &problems,
            "parties[2].name",
            "duplicate party name \"advertiser\" (first declared at parties[0])",
        );
        assert_has(&problems, "parties[1].name", "may only contain");
        assert_has(&problems, "parties[2].epsilon_budget", "found inf");
        // A badly named party is still a known party: no cascade.
        assert!(!has(&problems, "datasets[0].owner", "unknown party"));

        let no_parties = "[collaboration]\nname = \"x\"\n";
        assert_has(
            &super::tests::problems(no_parties),
            "parties",
            "at least one",
        );
    }

    #[test]
    fn dataset_names_must_be_unique_lowercase_sql_identifiers() {
        let mut text = edit(
            &sample(),
            "name = \"conversions\"",
            "name = \"impressions\"",
        );
        text = edit(&text, "name = \"campaigns\"", "name = \"2campaigns\"");
        let problems = problems(&text);
        assert_has(
            &problems,
            "datasets[1].name",
            "duplicate dataset name \"impressions\"",
        );
        assert_has(&problems, "datasets[2].name", "not a valid SQL identifier");
    }

    #[test]
    fn exactly_one_of_privacy_unit_and_public_is_required() {
        let both = edit(
            &sample(),
            "public = true\n",
            "public = true\nprivacy_unit = \"campaign_id\"\n",
        );
        assert_has(&problems(&both), "datasets[2].public", "not both");

        let neither = edit(&sample(), "public = true\n", "");
        assert_has(&problems(&neither), "datasets[2]", "either privacy_unit");

        let public_false = edit(&sample(), "public = true\n", "public = false\n");
        assert_has(
            &problems(&public_false),
            "datasets[2]",
            "either privacy_unit",
        );
    }

    #[test]
    fn privacy_unit_must_be_a_declared_join_key() {
        let undeclared = edit(&sample(), "uid = { role = \"join_key\" }\nts", "ts");
        assert_has(
            &problems(&undeclared),
            "datasets[0].privacy_unit",
            "column \"uid\" is not declared",
        );

        let wrong_role = edit(
            &sample(),
            "uid = { role = \"join_key\" }\nrevenue",
            "uid = { role = \"dimension\" }\nrevenue",
        );
        assert_has(
            &problems(&wrong_role),
            "datasets[1].privacy_unit",
            "must have role \"join_key\", not \"dimension\"",
        );
    }

    #[test]
    fn domain_rules_are_enforced() {
        let mut text = edit(&sample(), "{ min = 1, max = 50 }", "{ min = 50, max = 1 }");
        text = edit(
            &text,
            "[\"display\", \"email\", \"search\"]",
            "[\"display\", \"email\", \"display\"]",
        );
        text = edit(
            &text,
            "ts = { role = \"hidden\" }",
            "ts = { role = \"hidden\", domain = [\"a\"] }",
        );
        text = edit(
            &text,
            "is_return = { role = \"dimension\" }",
            "is_return = { role = \"dimension\", domain = [] }",
        );
        text = edit(
            &text,
            "campaign_id = { role = \"dimension\" }",
            "campaign_id = { role = \"dimension\", domain = { min = 1, max = 1001 } }",
        );
        let problems = problems(&text);
        assert_has(
            &problems,
            "datasets[0].columns.campaign_id.domain",
            "min 50 is above max 1",
        );
        assert_has(
            &problems,
            "datasets[0].columns.channel.domain[2]",
            "duplicate domain value \"display\"",
        );
        assert_has(
            &problems,
            "datasets[0].columns.ts.domain",
            "only allowed on dimension columns",
        );
        assert_has(
            &problems,
            "datasets[0].columns.is_return.domain",
            "must not be empty",
        );
        assert_has(
            &problems,
            "datasets[2].columns.campaign_id.domain",
            "has 1001 values, more than defaults.max_output_groups = 1000",
        );
        assert_eq!(problems.len(), 5, "{}", ProblemLines(&problems));
    }

    #[test]
    fn groups_per_person_and_rows_per_group_are_declared_and_checked() {
        let mut text = edit(
            &sample(),
            "channel = { role = \"dimension\", domain = [\"display\", \"email\", \"search\"] }",
            "channel = { role = \"dimension\", domain = [\"display\", \"email\", \"search\"], groups_per_person = \"all\" }",
        );
        text = edit(&text, "is_return = { role = \"dimension\" }", "is_return = { role = \"dimension\", groups_per_person = 2 }");
        text = edit(&text, "readers = [\"advertiser\"]\n", "readers = [\"advertiser\"]\nmax_contributions_per_group = 4\n");
        let manifest = Manifest::from_str(&text, Path::new("/manifests")).unwrap();
        let policy = manifest.policy_for("advertiser");
        let impressions = policy.dataset("impressions").unwrap();
        assert_eq!(
            impressions.role("channel"),
            ColumnRole::Dimension {
                domain: Some(Domain::Strings(vec!["display".into(), "email".into(), "search".into()])),
                groups_per_person: Some(3),
            }
        );
        assert_eq!(impressions.role("is_return"), ColumnRole::Dimension { domain: None, groups_per_person: Some(2) });
        assert_eq!(impressions.max_contributions_per_group, Some(4));

        let mut bad = edit(&sample(), "is_return = { role = \"dimension\" }", "is_return = { role = \"dimension\", groups_per_person = \"all\" }");
        bad = edit(&bad, "ts = { role = \"hidden\" }", "ts = { role = \"hidden\", groups_per_person = 1 }");
        bad = edit(&bad, "campaign_id = { role = \"dimension\", domain = { min = 1, max = 50 } }", "campaign_id = { role = \"dimension\", domain = { min = 1, max = 50 }, groups_per_person = 0 }");
        bad = edit(&bad, "public = true\n", "public = true\nmax_contributions_per_group = 2\n");
        let problems = problems(&bad);
        assert_has(&problems, "datasets[0].columns.is_return.groups_per_person", "needs a domain");
        assert_has(&problems, "datasets[0].columns.ts.groups_per_person", "only allowed on dimension columns");
        assert_has(&problems, "datasets[0].columns.campaign_id.groups_per_person", "at least 1");
        assert_has(&problems, "datasets[2].max_contributions_per_group", "only a protected dataset");
        assert_eq!(problems.len(), 4, "{}", ProblemLines(&problems));
    }

    #[test]
    fn join_keys_may_not_have_domains_or_bounds() {
        let text = edit(
            &sample(),
            "uid = { role = \"join_key\" }\nts",
            "uid = { role = \"join_key\", domain = [\"a\"], bounds = [0, 1] }\nts",
        );
        let problems = problems(&text);
        assert_has(
            &problems,
            "datasets[0].columns.uid.domain",
            "this column is a join_key",
        );
        assert_has(
            &problems,
            "datasets[0].columns.uid.bounds",
            "this column is a join_key",
        );
    }

    #[test]
    fn measures_require_finite_bounds() {
        let mut text = edit(
            &sample(),
            "cost_micros = { role = \"measure\", bounds = [0, 20000] }",
            "cost_micros = { role = \"measure\" }",
        );
        text = edit(&text, "bounds = [0.0, 500.5]", "bounds = [0.0, inf]");
        let problems = problems(&text);
        assert_has(
            &problems,
            "datasets[0].columns.cost_micros.bounds",
            "required for a measure column",
        );
        assert_has(
            &problems,
            "datasets[1].columns.revenue.bounds[1]",
            "must be finite",
        );
    }

    #[test]
    fn unknown_roles_and_keys_are_reported() {
        let mut text = edit(
            &sample(),
            "ts = { role = \"hidden\" }",
            "ts = { role = \"secret\", colour = 1 }",
        );
        text = edit(
            &text,
            "[collaboration]\n",
            "[collaboration]\nowner = \"me\"\n",
        );
        text = edit(
            &text,
            "max_output_groups = 1000\n",
            "max_output_groups = 1000\nmax_rows = 5\n",
        );
        text.push_str("\n[extras]\nx = 1\n");
        let problems = problems(&text);
        assert_has(
            &problems,
            "datasets[0].columns.ts.role",
            "unknown role \"secret\"",
        );
        assert_has(&problems, "datasets[0].columns.ts.colour", "unknown key");
        assert_has(&problems, "collaboration.owner", "unknown key");
        assert_has(&problems, "defaults.max_rows", "unknown key");
        assert_has(&problems, "extras", "unknown key");
    }

    #[test]
    fn type_errors_name_the_key_path() {
        let text = edit(
            &sample(),
            "epsilon_budget = 50.0",
            "epsilon_budget = \"fifty\"",
        );
        let problems = problems(&text);
        assert_eq!(
            problems,
            vec![Problem::new(
                "parties[0].epsilon_budget",
                "expected a number, found string \"fifty\""
            )]
        );
    }

    #[test]
    fn invalid_defaults_are_reported() {
        let text = edit(
            &sample(),
            "epsilon = 1.0",
            "epsilon = 6.0\nmax_groups_contributed = 0\nmax_contributions_per_group = -2",
        );
        let problems = problems(&text);
        assert_has(
            &problems,
            "defaults.epsilon",
            "epsilon 6 is above max_epsilon_per_query 5",
        );
        assert_has(&problems, "defaults.max_groups_contributed", "at least 1");
        assert_has(
            &problems,
            "defaults.max_contributions_per_group",
            "at least 1",
        );

        let nan = edit(&sample(), "epsilon = 1.0", "epsilon = nan");
        assert_has(
            &super::tests::problems(&nan),
            "defaults.epsilon",
            "finite number above 0",
        );
    }

    #[test]
    fn syntax_error_names_the_line() {
        let text = "[collaboration]\nname = \"x\"\n\n[[parties]]\nname = = \"a\"\n";
        let problems = problems(text);
        assert_eq!(problems.len(), 1);
        assert!(
            problems[0].path.starts_with("line 5, column "),
            "{}",
            problems[0]
        );
    }

    #[test]
    fn unsupported_location_schemes_are_reported() {
        let mut text = edit(
            &sample(),
            "location = \"/srv/cleanroom/conversions\"",
            "location = \"s3://bucket/conversions/\"",
        );
        text = edit(
            &text,
            "location = \"data/impressions/\"",
            "location = \"ftp://host/x\"",
        );
        text = edit(&text, "location = \"s3://bucket/conversions/\"", "location = \"gs://bucket/conversions/\"");
        let problems = problems(&text);
        assert_has(
            &problems,
            "datasets[1].location",
            "gs:// locations are not supported yet",
        );
        assert_has(
            &problems,
            "datasets[0].location",
            "unsupported URL scheme \"ftp\"",
        );
    }

    #[test]
    fn s3_locations_resolve_to_bucket_and_prefix() {
        let manifest = Manifest::from_str(&sample(), Path::new("/m")).unwrap();
        let mut dataset = manifest.dataset("conversions").unwrap().clone();
        dataset.location = "s3://my-bucket/clean/conversions/".to_string();
        assert_eq!(
            dataset.location(&manifest.base_dir).unwrap(),
            Location::S3 { bucket: "my-bucket".into(), prefix: "clean/conversions".into() }
        );
        let err = dataset.local_path(&manifest.base_dir).unwrap_err();
        assert!(matches!(err, ManifestError::Location { .. }));
        dataset.location = "s3://Bad_Bucket/x".to_string();
        assert!(dataset.location(&manifest.base_dir).unwrap_err().to_string().contains("not an S3 bucket name"));

        dataset.location = "file://otherhost/x".to_string();
        assert!(dataset.local_path(&manifest.base_dir).is_err());
        dataset.location = "file://localhost/srv/x".to_string();
        assert_eq!(
            dataset.local_path(&manifest.base_dir).unwrap(),
            PathBuf::from("/srv/x")
        );
    }

    #[test]
    fn s3_settings_are_checked() {
        let text = format!("{}\n[s3]\nendpoint = \"http://127.0.0.1:9000\"\nregion = \"eu-west-1\"\naccess_key_id = \"k\"\n", sample());
        let problems = problems(&text);
        assert_has(&problems, "s3.endpoint", "set allow_http = true");
        assert_has(&problems, "s3", "give both access_key_id and secret_access_key");
        let text = format!("{}\n[s3]\nendpoint = \"http://127.0.0.1:9000\"\nallow_http = true\naccess_key_id = \"k\"\nsecret_access_key = \"s\"\n", sample());
        let manifest = Manifest::from_str(&text, Path::new("/m")).unwrap();
        let s3 = manifest.s3.unwrap();
        assert_eq!((s3.endpoint.as_deref(), s3.allow_http), (Some("http://127.0.0.1:9000"), true));
        assert!(!format!("{s3:?}").contains("\"s\""), "the secret is not printed");
    }

    #[test]
    fn data_files_need_not_exist_yet() {
        // `/srv/cleanroom/...` does not exist on the test machine.
        assert!(Manifest::from_str(&sample(), Path::new("/nonexistent")).is_ok());
    }

    #[test]
    fn check_reports_an_unreadable_file_as_one_problem() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("missing.toml");
        let problems = Manifest::check(&path);
        assert_eq!(problems.len(), 1);
        assert_eq!(problems[0].path, path.display().to_string());
    }
}
