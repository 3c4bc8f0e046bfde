//! The test cluster's certificates and keys, generated in-process with rcgen:
//! a CA, the API server's serving certificate (for 127.0.0.1 and the in-cluster
//! names), client certificates (the admin is `system:masters`), and the
//! service-account signing key pair.
//!
//! Every file lands in one directory inside the test's temp dir, so tearing
//! the temp dir down removes every secret with it.

use std::{
    fs,
    path::{Path, PathBuf},
};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};

use crate::HarnessError;

/// A certificate and its private key, as PEM files.
#[derive(Debug, Clone)]
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// The cluster's PKI on disk, and the CA to issue more certificates with.
pub struct Pki {
    dir: PathBuf,
    ca: Issuer<'static, KeyPair>,
    pub ca_files: CertFiles,
    pub apiserver: CertFiles,
    pub admin: CertFiles,
    /// Private key the API server and the controller manager sign
    /// service-account tokens with.
    pub service_account_key: PathBuf,
    /// Its public half, for verifying those tokens.
    pub service_account_pub: PathBuf,
}

fn cert_error(what: &'static str) -> impl FnOnce(rcgen::Error) -> HarnessError {
    move |source| HarnessError::Certificate { what, source }
}

fn write(path: &Path, contents: &str) -> Result<(), HarnessError> {
    fs::write(path, contents).map_err(|source| HarnessError::Io {
        action: "writing",
        path: path.to_owned(),
        source,
    })
}

fn subject(common_name: &str, organizations: &[&str]) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    for org in organizations {
        dn.push(DnType::OrganizationName, *org);
    }
    dn.push(DnType::CommonName, common_name);
    dn
}

impl Pki {
    /// Generates the CA, the API server's and the admin's certificates and the
    /// service-account keys into `dir`.
    pub fn generate(dir: &Path) -> Result<Self, HarnessError> {
        Self::generate_with_names(dir, &[])
    }

    /// Like [`Self::generate`], with further names and addresses in the API
    /// server's serving certificate (the address nodes reach it at, the
    /// `kubernetes` Service's ClusterIP).
    pub fn generate_with_names(dir: &Path, extra_names: &[&str]) -> Result<Self, HarnessError> {
        fs::create_dir_all(dir).map_err(|source| HarnessError::Io {
            action: "creating",
            path: dir.to_owned(),
            source,
        })?;
        let ca_key = KeyPair::generate().map_err(cert_error("CA"))?;
        let mut ca_params = CertificateParams::default();
        ca_params.distinguished_name = subject("twinvol-e2e-ca", &[]);
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_cert = ca_params.self_signed(&ca_key).map_err(cert_error("CA"))?;
        let ca_files = CertFiles {
            cert: dir.join("ca.crt"),
            key: dir.join("ca.key"),
        };
        write(&ca_files.cert, &ca_cert.pem())?;
        write(&ca_files.key, &ca_key.serialize_pem())?;
        let ca = Issuer::new(ca_params, ca_key);

        let mut pki = Self {
            dir: dir.to_owned(),
            ca,
            ca_files,
            apiserver: CertFiles {
                cert: PathBuf::new(),
                key: PathBuf::new(),
            },
            admin: CertFiles {
                cert: PathBuf::new(),
                key: PathBuf::new(),
            },
            service_account_key: dir.join("sa.key"),
            service_account_pub: dir.join("sa.pub"),
        };
        let mut names = vec![
            "127.0.0.1",
            "10.0.0.1",
            "localhost",
            "kubernetes",
            "kubernetes.default",
            "kubernetes.default.svc",
            "kubernetes.default.svc.cluster.local",
        ];
        for name in extra_names {
            if !names.contains(name) {
                names.push(name);
            }
        }
        pki.apiserver = pki.issue_server("kube-apiserver", &names)?;
        pki.admin = pki.issue_client("admin", "twinvol-e2e-admin", &["system:masters"])?;

        let sa = KeyPair::generate().map_err(cert_error("service-account"))?;
        write(&pki.service_account_key, &sa.serialize_pem())?;
        write(&pki.service_account_pub, &sa.public_key_pem())?;
        Ok(pki)
    }

    /// A serving certificate for `names` (IP addresses and DNS names), signed
    /// by the CA, written as `<file_stem>.crt`/`.key`.
    pub fn issue_server(&self, file_stem: &str, names: &[&str]) -> Result<CertFiles, HarnessError> {
        let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
        let mut params = CertificateParams::new(names).map_err(cert_error("serving"))?;
        params.distinguished_name = subject(file_stem, &[]);
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.sign(file_stem, params, "serving")
    }

    /// A client certificate: Kubernetes reads the user from the common name
    /// and the groups from the organizations.
    pub fn issue_client(
        &self,
        file_stem: &str,
        user: &str,
        groups: &[&str],
    ) -> Result<CertFiles, HarnessError> {
        let mut params = CertificateParams::default();
        params.distinguished_name = subject(user, groups);
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.sign(file_stem, params, "client")
    }

    fn sign(
        &self,
        file_stem: &str,
        params: CertificateParams,
        what: &'static str,
    ) -> Result<CertFiles, HarnessError> {
        let key = KeyPair::generate().map_err(cert_error(what))?;
        let cert = params.signed_by(&key, &self.ca).map_err(cert_error(what))?;
        let files = CertFiles {
            cert: self.dir.join(format!("{file_stem}.crt")),
            key: self.dir.join(format!("{file_stem}.key")),
        };
        write(&files.cert, &cert.pem())?;
        write(&files.key, &key.serialize_pem())?;
        Ok(files)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generates_every_file_as_pem() {
        let dir = tempfile::tempdir().expect("temp dir");
        let pki = Pki::generate(dir.path()).expect("generates");
        for (path, marker) in [
            (&pki.ca_files.cert, "BEGIN CERTIFICATE"),
            (&pki.ca_files.key, "BEGIN PRIVATE KEY"),
            (&pki.apiserver.cert, "BEGIN CERTIFICATE"),
            (&pki.admin.key, "BEGIN PRIVATE KEY"),
            (&pki.service_account_key, "BEGIN PRIVATE KEY"),
            (&pki.service_account_pub, "BEGIN PUBLIC KEY"),
        ] {
            let text = fs::read_to_string(path).expect("readable");
            assert!(text.contains(marker), "{} lacks {marker}", path.display());
        }
    }

    #[test]
    fn further_client_certificates_can_be_issued() {
        let dir = tempfile::tempdir().expect("temp dir");
        let pki = Pki::generate(dir.path()).expect("generates");
        let kubelet = pki
            .issue_client("node-a1", "system:node:node-a1", &["system:nodes"])
            .expect("issues");
        assert!(kubelet.cert.ends_with("node-a1.crt"));
        assert!(kubelet.cert.exists() && kubelet.key.exists());
    }
}
