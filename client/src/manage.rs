//! Methods of [`Client`] for what an operator or an admin tool does:
//! revocation (PROTOCOL.md §3.13–3.16), the lifecycle of a key (§3.19–3.22),
//! `rewrap` (§3.23) and bring-your-own-key import (§3.35–3.36). The
//! application's own operations (encrypt, datakey, mac, sign…) are in
//! [`crate::client`]; each method here is one request, typed both ways,
//! and has a blocking twin in [`crate::blocking::Client`].

use crate::context::EncryptionContext;
use crate::error::Error;
use crate::import::{KeyImport, KeyImportParams, KeyImportParamsResponse, WrappingAlgorithm};
use crate::lifecycle::{
    KeyCancelDeletion, KeyDetails, KeyScheduleDeletion, KeySet, KeyTrim, KeyTrimResponse, Rewrap,
    RewrapResponse,
};
use crate::names::KeyPath;
use crate::revocation::{Destroy, DestroyResponse, Reason, Revocation, Revoke, RevokeLift, Scope};
use crate::typed::AsText;
use crate::{Client, KeyType};

impl Client {
    /// Suspends `scope` (`revoke`): nothing under it opens or is made
    /// until it is lifted, or until `expires_at` (Unix seconds) if given.
    /// Checked here first ([`Scope::validate`]), so a malformed scope is
    /// refused before anything is sent.
    ///
    /// ```no_run
    /// # async fn run(client: keyhaven::Client) -> Result<(), keyhaven::Error> {
    /// use keyhaven::revocation::{Reason, Scope};
    ///
    /// let key: keyhaven::KeyPath = "acme/pii".parse()?;
    /// let suspended = client.revoke(&Scope::key(&key), Reason::KeyCompromise, None).await?;
    /// assert_eq!(suspended.scope, Scope::key(&key));
    /// client.revoke_lift(&Scope::key(&key), Reason::Unspecified).await?;
    /// # Ok(()) }
    /// ```
    pub async fn revoke(
        &self,
        scope: &Scope,
        reason: Reason,
        expires_at: Option<u64>,
    ) -> Result<Revocation, Error> {
        scope.validate()?;
        self.call(&Revoke { scope: scope.clone(), reason, expires_at }).await
    }

    /// Ends the suspension of exactly `scope` (`revoke_lift`) and answers
    /// it. Lifting the whole system's needs `break-glass` as well.
    pub async fn revoke_lift(&self, scope: &Scope, reason: Reason) -> Result<Revocation, Error> {
        scope.validate()?;
        Ok(self.call(&RevokeLift { scope: scope.clone(), reason }).await?.lifted)
    }

    /// Erases for good the key material under a suspended key, key
    /// version or tenant (`destroy`). `confirm` is the scope's name typed
    /// again (`tenant/key` or `tenant`), as the daemon demands: pass what
    /// a person typed, not a value derived from `scope`.
    pub async fn destroy(&self, scope: &Scope, confirm: &str) -> Result<DestroyResponse, Error> {
        scope.validate()?;
        self.call(&Destroy { scope: scope.clone(), confirm: confirm.into() }).await
    }

    /// Changes a key's settings (`key_set`): the fields of `change` that
    /// are `Some`; its `tenant` and `key` are taken from `path`.
    ///
    /// ```no_run
    /// # async fn run(client: keyhaven::Client) -> Result<(), keyhaven::Error> {
    /// use keyhaven::lifecycle::{KeySet, KeyState};
    ///
    /// let key: keyhaven::KeyPath = "acme/pii".parse()?;
    /// // Make nothing new under it (what it encrypted still opens).
    /// let details =
    ///     client.key_set(&key, KeySet { state: Some(KeyState::Disabled), ..Default::default() }).await?;
    /// assert_eq!(details.state, KeyState::Disabled);
    /// # Ok(()) }
    /// ```
    pub async fn key_set(&self, path: &KeyPath, change: KeySet) -> Result<KeyDetails, Error> {
        self.call(&KeySet { tenant: path.tenant().into(), key: path.key().into(), ..change }).await
    }

    /// Deletes for good the versions of `path` below its minimum
    /// decryption version (`key_trim`).
    pub async fn key_trim(&self, path: &KeyPath) -> Result<KeyTrimResponse, Error> {
        self.call(&KeyTrim { tenant: path.tenant().into(), key: path.key().into() }).await
    }

    /// Stops every use of `path` now and erases it after `days` (7 to 30;
    /// 30 when `None`) (`key_schedule_deletion`).
    pub async fn key_schedule_deletion(
        &self,
        path: &KeyPath,
        days: Option<u32>,
    ) -> Result<KeyDetails, Error> {
        self.call(&KeyScheduleDeletion { tenant: path.tenant().into(), key: path.key().into(), days }).await
    }

    /// Cancels a scheduled deletion; the key is `disabled` afterwards
    /// (`key_cancel_deletion`).
    pub async fn key_cancel_deletion(&self, path: &KeyPath) -> Result<KeyDetails, Error> {
        self.call(&KeyCancelDeletion { tenant: path.tenant().into(), key: path.key().into() }).await
    }

    /// A `khe1:` envelope or `khc1:` ciphertext under the current version
    /// of its key (`rewrap`), made inside the daemon: the data key never
    /// leaves it. Input already under the current version comes back
    /// unchanged.
    pub async fn rewrap(
        &self,
        text: &(impl AsText + ?Sized),
        context: &EncryptionContext,
    ) -> Result<RewrapResponse, Error> {
        self.call(&Rewrap { text: text.as_text().into_owned(), context: context.clone() }).await
    }

    /// A one-time RSA wrapping public key and an import token for one
    /// import of material of `key_type` into `path` (`key_import_params`;
    /// the customer's side is in OPERATIONS.md §16).
    pub async fn key_import_params(
        &self,
        path: &KeyPath,
        key_type: KeyType,
        expires_in_secs: Option<u64>,
    ) -> Result<KeyImportParamsResponse, Error> {
        self.call(&KeyImportParams {
            tenant: path.tenant().into(),
            key: path.key().into(),
            key_type,
            expires_in_secs,
        })
        .await
    }

    /// Makes `path` (or a new version of an imported key) from material
    /// wrapped to the public key of [`Client::key_import_params`]
    /// (`key_import`); `wrapped` is the wrapped bytes, base64 (they are
    /// encrypted: not a secret).
    pub async fn key_import(
        &self,
        path: &KeyPath,
        import_token: &str,
        algorithm: WrappingAlgorithm,
        wrapped: &str,
    ) -> Result<KeyDetails, Error> {
        self.call(&KeyImport {
            tenant: path.tenant().into(),
            key: path.key().into(),
            import_token: import_token.into(),
            algorithm,
            wrapped: wrapped.into(),
        })
        .await
    }
}
