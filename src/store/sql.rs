//! Dynamic SQL that runs on both databases: [`Sql`] numbers its placeholders `$1, $2, …`, which
//! PostgreSQL requires and SQLite accepts (sqlx's `QueryBuilder<Any>` writes `?`, which
//! PostgreSQL refuses), and [`Dialect`] names the few constructs that differ.

use sqlx::any::{AnyArguments, AnyRow};
use sqlx::{Any, Arguments, AssertSqlSafe, Encode, Type};

/// Which database a store talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    /// Embedded SQLite (the default, a file in the data folder).
    Sqlite,
    /// PostgreSQL, shared by several replicas.
    Postgres,
}

impl Dialect {
    /// From a database URL's scheme.
    pub fn of_url(url: &str) -> Option<Self> {
        if url.starts_with("sqlite:") {
            Some(Self::Sqlite)
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Some(Self::Postgres)
        } else {
            None
        }
    }

    /// `GROUP_CONCAT(DISTINCT col)` with `,` between values.
    pub fn concat_distinct(self, col: &str) -> String {
        match self {
            Self::Sqlite => format!("GROUP_CONCAT(DISTINCT {col})"),
            Self::Postgres => format!("STRING_AGG(DISTINCT {col}, ',')"),
        }
    }

    /// A row lock clause for a claim subquery (`FOR UPDATE SKIP LOCKED` on PostgreSQL;
    /// SQLite serialises writers, so it needs none).
    pub fn skip_locked(self) -> &'static str {
        match self {
            Self::Sqlite => "",
            Self::Postgres => " FOR UPDATE SKIP LOCKED",
        }
    }
}

/// A statement under construction: text plus bound values.
#[derive(Default)]
pub struct Sql {
    text: String,
    args: AnyArguments,
    n: usize,
    failed: Option<String>,
}

impl Sql {
    /// Starts with `text`.
    pub fn new(text: impl Into<String>) -> Self {
        Self {
            text: text.into(),
            ..Self::default()
        }
    }

    /// Appends SQL text (never user data: that goes through [`Self::bind`]).
    pub fn push(&mut self, text: impl AsRef<str>) -> &mut Self {
        self.text.push_str(text.as_ref());
        self
    }

    /// Appends a placeholder bound to `value`.
    pub fn bind<T>(&mut self, value: T) -> &mut Self
    where
        T: for<'q> Encode<'q, Any> + Type<Any> + 'static,
    {
        self.n += 1;
        self.text.push('$');
        self.text.push_str(&self.n.to_string());
        if let Err(e) = self.args.add(value) {
            self.failed.get_or_insert(e.to_string());
        }
        self
    }

    /// Runs the statement, returning its rows.
    ///
    /// # Errors
    /// Database errors, or a value that could not be encoded.
    pub async fn fetch_all(self, pool: &sqlx::AnyPool) -> Result<Vec<AnyRow>, sqlx::Error> {
        if let Some(e) = self.failed {
            return Err(sqlx::Error::Encode(e.into()));
        }
        sqlx::query_with(AssertSqlSafe(self.text), self.args)
            .fetch_all(pool)
            .await
    }

    /// Runs the statement on `conn` (e.g. inside a transaction), returning the rows affected.
    /// Not kept in the connection's statement cache: built statements vary in length.
    ///
    /// # Errors
    /// As [`Self::fetch_all`].
    pub async fn execute(self, conn: &mut sqlx::AnyConnection) -> Result<u64, sqlx::Error> {
        if let Some(e) = self.failed {
            return Err(sqlx::Error::Encode(e.into()));
        }
        Ok(sqlx::query_with(AssertSqlSafe(self.text), self.args)
            .persistent(false)
            .execute(conn)
            .await?
            .rows_affected())
    }

    /// Runs the statement, returning its single scalar.
    ///
    /// # Errors
    /// As [`Self::fetch_all`], or no row.
    pub async fn fetch_scalar<T>(self, pool: &sqlx::AnyPool) -> Result<T, sqlx::Error>
    where
        T: for<'r> sqlx::Decode<'r, Any> + Type<Any> + Send + Unpin,
    {
        if let Some(e) = self.failed {
            return Err(sqlx::Error::Encode(e.into()));
        }
        sqlx::query_scalar_with(AssertSqlSafe(self.text), self.args)
            .fetch_one(pool)
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_are_numbered() {
        let mut q = Sql::new("SELECT 1 WHERE a = ");
        q.bind("x".to_string()).push(" AND b = ").bind(2_i64);
        assert_eq!(q.text, "SELECT 1 WHERE a = $1 AND b = $2");
        assert_eq!(Dialect::of_url("postgres://h/db"), Some(Dialect::Postgres));
        assert_eq!(Dialect::of_url("sqlite:///x.db"), Some(Dialect::Sqlite));
        assert_eq!(Dialect::of_url("mysql://h/db"), None);
    }
}
