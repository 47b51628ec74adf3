//! SMART on FHIR scopes: App Launch 2.x (`system/Observation.rs`, `user/*.cruds`,
//! `patient/ImagingStudy.r`) and v1 (`.read`, `.write`, `.*`), and what each interaction needs.

use std::fmt;

/// A FHIR interaction, as SMART v2 permissions name them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Interaction {
    /// `c`: create.
    Create,
    /// `r`: read, vread.
    Read,
    /// `u`: update.
    Update,
    /// `d`: delete.
    Delete,
    /// `s`: search.
    Search,
}

impl Interaction {
    /// The SMART v2 permission letter.
    pub fn letter(self) -> char {
        match self {
            Self::Create => 'c',
            Self::Read => 'r',
            Self::Update => 'u',
            Self::Delete => 'd',
            Self::Search => 's',
        }
    }
}

/// Whose data a scope covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Context {
    /// `patient/`: the patient of the token's `patient` claim only.
    Patient,
    /// `user/`: what the user may see (Carina has no finer user policy: all of it).
    User,
    /// `system/`: a backend service, all of it.
    System,
}

/// One resource scope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scope {
    /// Context.
    pub context: Context,
    /// Resource type, or `*`.
    pub resource: String,
    /// Permissions among `cruds`.
    pub permissions: String,
}

impl Scope {
    /// Parses a resource scope; other scopes (`openid`, `launch`, `fhirUser`,
    /// `offline_access`) and scopes with query constraints (`?category=…`, which Carina
    /// cannot enforce) give `None` and grant nothing.
    pub fn parse(s: &str) -> Option<Self> {
        let (context, rest) = s.split_once('/')?;
        let context = match context {
            "patient" => Context::Patient,
            "user" => Context::User,
            "system" => Context::System,
            _ => return None,
        };
        let (resource, perms) = rest.split_once('.')?;
        if resource.is_empty()
            || !(resource == "*" || resource.chars().all(|c| c.is_ascii_alphanumeric()))
        {
            return None;
        }
        let permissions = match perms {
            "read" => "rs".to_string(),
            "write" => "cud".to_string(),
            "*" => "cruds".to_string(),
            p if !p.is_empty() && is_ordered_subset(p) => p.to_string(),
            _ => return None,
        };
        Some(Self {
            context,
            resource: resource.to_string(),
            permissions,
        })
    }

    /// Whether this scope allows `interaction` on `resource_type`.
    pub fn allows(&self, resource_type: &str, interaction: Interaction) -> bool {
        (self.resource == "*" || self.resource == resource_type)
            && self.permissions.contains(interaction.letter())
    }
}

/// SMART v2 permissions appear in the order c, r, u, d, s, each at most once.
fn is_ordered_subset(p: &str) -> bool {
    let order = "cruds";
    let mut last = None;
    for c in p.chars() {
        match order.find(c) {
            Some(i) if last.is_none_or(|l| i > l) => last = Some(i),
            _ => return false,
        }
    }
    true
}

/// The scopes of a token.
#[derive(Debug, Clone, Default)]
pub struct Scopes(Vec<Scope>);

impl Scopes {
    /// Parses a space-separated `scope` claim.
    pub fn parse<'a>(scopes: impl IntoIterator<Item = &'a str>) -> Self {
        Self(scopes.into_iter().filter_map(Scope::parse).collect())
    }

    /// The widest context among the scopes that allow `interaction` on `resource_type`
    /// (`system` or `user` beat `patient`), or `None`.
    pub fn grant(&self, resource_type: &str, interaction: Interaction) -> Option<Context> {
        let mut best = None;
        for s in self
            .0
            .iter()
            .filter(|s| s.allows(resource_type, interaction))
        {
            match s.context {
                Context::System | Context::User => return Some(s.context),
                Context::Patient => best = Some(Context::Patient),
            }
        }
        best
    }

    /// Whether a `system/` scope allows reading every resource type: Carina's operator
    /// scope (jobs, exports, metrics).
    pub fn operator(&self) -> bool {
        self.0.iter().any(|s| {
            s.context == Context::System && s.resource == "*" && s.permissions.contains('r')
        })
    }
}

/// The scope a refused request should have carried, for `WWW-Authenticate` and the
/// OperationOutcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Missing(pub String);

impl Missing {
    /// `user/{type}.{letter}` (or `system/…`, or `patient/…` in the patient's compartment).
    pub fn of(resource_type: &str, interaction: Interaction) -> Self {
        Self(format!(
            "user/{resource_type}.{} (or system/ or patient/)",
            interaction.letter()
        ))
    }

    /// The operator scope.
    pub fn operator() -> Self {
        Self("system/*.r (operator)".into())
    }

    /// The scope token alone (for the `scope` parameter of `WWW-Authenticate`).
    pub fn token(&self) -> &str {
        self.0.split(' ').next().unwrap_or("")
    }
}

impl fmt::Display for Missing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v2_and_v1_scopes_grant_what_they_say() {
        let s = Scopes::parse("system/Observation.rs user/Patient.cruds patient/*.read launch openid system/Condition.rs?category=x system/Bad.sr".split(' '));
        assert_eq!(
            s.grant("Observation", Interaction::Read),
            Some(Context::System)
        );
        assert_eq!(
            s.grant("Observation", Interaction::Search),
            Some(Context::System)
        );
        assert_eq!(
            s.grant("Observation", Interaction::Create),
            None,
            "rs does not create"
        );
        assert_eq!(s.grant("Patient", Interaction::Delete), Some(Context::User));
        assert_eq!(
            s.grant("ImagingStudy", Interaction::Read),
            Some(Context::Patient)
        );
        assert_eq!(s.grant("ImagingStudy", Interaction::Update), None);
        assert_eq!(
            s.grant("Condition", Interaction::Read),
            Some(Context::Patient),
            "query-constrained scopes grant nothing by themselves"
        );
        assert_eq!(
            s.grant("Bad", Interaction::Read),
            Some(Context::Patient),
            "out-of-order permissions are not a scope"
        );
        assert!(!s.operator());
        assert!(Scopes::parse(["system/*.rs"]).operator());
        assert!(Scopes::parse(["system/*.read"]).operator());
        assert!(!Scopes::parse(["user/*.rs"]).operator());
        let w = Scopes::parse(["user/Observation.write"]);
        assert!(w.grant("Observation", Interaction::Update).is_some());
        assert!(w.grant("Observation", Interaction::Read).is_none());
        let all = Scopes::parse(["user/*.*"]);
        assert!(all.grant("Anything", Interaction::Delete).is_some());
    }
}
