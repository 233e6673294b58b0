//! Reading the PEM files of a `cacerts` directory: certificate bundles, and a signing key in any
//! of the encodings organisations actually have on disk (PKCS#8, PKCS#1 RSA, SEC1 EC), handed on
//! as PKCS#8 because that is the only form `ring` signs with. Knows nothing about what the
//! certificates mean; `ca` decides that.

use std::path::Path;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use super::IdentityError;

/// Every certificate in a PEM file, in file order; an empty file is an error.
pub(crate) fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, IdentityError> {
    let bytes = read(path)?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|err| bad(path, format!("not a PEM certificate bundle: {err}")))?;
    if certs.is_empty() {
        return Err(bad(path, "holds no CERTIFICATE block".to_string()));
    }
    Ok(certs)
}

/// The single private key in a PEM file, converted to PKCS#8.
pub(crate) fn read_key(path: &Path) -> Result<PrivatePkcs8KeyDer<'static>, IdentityError> {
    let bytes = read(path)?;
    let key = PrivateKeyDer::from_pem_slice(&bytes)
        .map_err(|err| bad(path, format!("no usable private key: {err}")))?;
    match key {
        PrivateKeyDer::Pkcs8(key) => Ok(key),
        PrivateKeyDer::Pkcs1(rsa) => Ok(pkcs8_from_pkcs1(rsa.secret_pkcs1_der())),
        PrivateKeyDer::Sec1(ec) => pkcs8_from_sec1(ec.secret_sec1_der()).ok_or_else(|| {
            bad(
                path,
                "EC PRIVATE KEY is malformed or not on P-256/P-384".into(),
            )
        }),
        _ => Err(bad(path, "unsupported private key encoding".to_string())),
    }
}

fn read(path: &Path) -> Result<Vec<u8>, IdentityError> {
    std::fs::read(path).map_err(|source| IdentityError::Io {
        path: path.display().to_string(),
        source,
    })
}

fn bad(path: &Path, reason: String) -> IdentityError {
    IdentityError::BadPem {
        path: path.display().to_string(),
        reason,
    }
}

const OID_RSA_ENCRYPTION: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01];
const OID_EC_PUBLIC_KEY: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01];
const OID_P256: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
const OID_P384: &[u8] = &[0x2b, 0x81, 0x04, 0x00, 0x22];

const TAG_INTEGER: u8 = 0x02;
const TAG_OCTET_STRING: u8 = 0x04;
const TAG_NULL: u8 = 0x05;
const TAG_OID: u8 = 0x06;
const TAG_SEQUENCE: u8 = 0x30;
const TAG_EC_PARAMETERS: u8 = 0xa0;
const TAG_EC_PUBLIC_KEY: u8 = 0xa1;

/// PrivateKeyInfo { version 0, rsaEncryption, OCTET STRING { RSAPrivateKey } }.
fn pkcs8_from_pkcs1(rsa: &[u8]) -> PrivatePkcs8KeyDer<'static> {
    let algorithm = der(
        TAG_SEQUENCE,
        &[der(TAG_OID, OID_RSA_ENCRYPTION), der(TAG_NULL, &[])].concat(),
    );
    private_key_info(&algorithm, rsa)
}

/// PrivateKeyInfo { version 0, ecPublicKey + curve, OCTET STRING { ECPrivateKey } }. The curve
/// moves from the SEC1 `[0] parameters` into the algorithm identifier, and the inner copy is
/// dropped because ring refuses PKCS#8 keys that still carry it.
fn pkcs8_from_sec1(sec1: &[u8]) -> Option<PrivatePkcs8KeyDer<'static>> {
    let (TAG_SEQUENCE, body, []) = split_tlv(sec1)? else {
        return None;
    };
    let (TAG_INTEGER, version, rest) = split_tlv(body)? else {
        return None;
    };
    let (TAG_OCTET_STRING, scalar, mut rest) = split_tlv(rest)? else {
        return None;
    };
    let mut curve = None;
    let mut public_key = None;
    while !rest.is_empty() {
        let (tag, value, next) = split_tlv(rest)?;
        match tag {
            TAG_EC_PARAMETERS => {
                let (TAG_OID, oid, []) = split_tlv(value)? else {
                    return None;
                };
                curve = Some(oid);
            }
            TAG_EC_PUBLIC_KEY => public_key = Some(value),
            _ => return None,
        }
        rest = next;
    }
    let curve = match curve {
        Some(oid) => oid,
        // Without parameters the scalar's length is the only hint of the curve.
        None if scalar.len() == 32 => OID_P256,
        None if scalar.len() == 48 => OID_P384,
        None => return None,
    };
    if curve != OID_P256 && curve != OID_P384 {
        return None;
    }
    let mut inner = [der(TAG_INTEGER, version), der(TAG_OCTET_STRING, scalar)].concat();
    if let Some(public_key) = public_key {
        inner.extend(der(TAG_EC_PUBLIC_KEY, public_key));
    }
    let algorithm = der(
        TAG_SEQUENCE,
        &[der(TAG_OID, OID_EC_PUBLIC_KEY), der(TAG_OID, curve)].concat(),
    );
    Some(private_key_info(&algorithm, &der(TAG_SEQUENCE, &inner)))
}

fn private_key_info(algorithm: &[u8], key: &[u8]) -> PrivatePkcs8KeyDer<'static> {
    let body = [
        der(TAG_INTEGER, &[0]),
        algorithm.to_vec(),
        der(TAG_OCTET_STRING, key),
    ]
    .concat();
    PrivatePkcs8KeyDer::from(der(TAG_SEQUENCE, &body))
}

/// One DER element: tag, definite length, value.
pub(crate) fn der(tag: u8, value: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    let len = value.len();
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes: Vec<u8> = len
            .to_be_bytes()
            .into_iter()
            .skip_while(|b| *b == 0)
            .collect();
        out.push(0x80 | bytes.len() as u8);
        out.extend(bytes);
    }
    out.extend_from_slice(value);
    out
}

/// Splits the first DER element off `input`: (tag, value, rest). Only what keys need: one-byte
/// tags and definite lengths up to four bytes.
fn split_tlv(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let count = usize::from(first & 0x7f);
        if count == 0 || count > 4 || rest.len() < count {
            return None;
        }
        let (len_bytes, rest) = rest.split_at(count);
        let len = len_bytes
            .iter()
            .fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
        (len, rest)
    };
    if rest.len() < len {
        return None;
    }
    let (value, rest) = rest.split_at(len);
    Some((tag, value, rest))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Takes a PKCS#8 EC key apart into the SEC1 form openssl writes (with `[0] parameters`).
    fn sec1_with_parameters(pkcs8: &[u8]) -> Vec<u8> {
        let (_, info, _) = split_tlv(pkcs8).unwrap();
        let (_, _version, rest) = split_tlv(info).unwrap();
        let (_, algorithm, rest) = split_tlv(rest).unwrap();
        let (_, _ec_oid, curve_rest) = split_tlv(algorithm).unwrap();
        let (_, curve, _) = split_tlv(curve_rest).unwrap();
        let (_, inner, _) = split_tlv(rest).unwrap();
        let (_, sec1_body, _) = split_tlv(inner).unwrap();
        let (_, version, rest) = split_tlv(sec1_body).unwrap();
        let (_, scalar, rest) = split_tlv(rest).unwrap();
        let mut body = [
            der(TAG_INTEGER, version),
            der(TAG_OCTET_STRING, scalar),
            der(TAG_EC_PARAMETERS, &der(TAG_OID, curve)),
        ]
        .concat();
        body.extend_from_slice(rest);
        der(TAG_SEQUENCE, &body)
    }

    #[test]
    fn sec1_keys_with_parameters_become_pkcs8_that_ring_accepts() {
        let original = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let sec1 = sec1_with_parameters(original.serialized_der());
        let pkcs8 = pkcs8_from_sec1(&sec1).expect("converts");
        let converted = rcgen::KeyPair::try_from(pkcs8.secret_pkcs8_der()).expect("ring parses");
        assert_eq!(converted.public_key_raw(), original.public_key_raw());
    }

    #[test]
    fn key_files_in_sec1_pem_are_read() {
        let original = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
        let sec1 = sec1_with_parameters(original.serialized_der());
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ca-key.pem");
        let body = base64_lines(&sec1);
        std::fs::write(
            &path,
            format!("-----BEGIN EC PRIVATE KEY-----\n{body}-----END EC PRIVATE KEY-----\n"),
        )
        .unwrap();
        let key = read_key(&path).unwrap();
        let converted = rcgen::KeyPair::try_from(key.secret_pkcs8_der()).unwrap();
        assert_eq!(converted.public_key_raw(), original.public_key_raw());
    }

    #[test]
    fn garbage_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ca-key.pem");
        std::fs::write(&path, "not a key").unwrap();
        let err = read_key(&path).unwrap_err();
        assert!(err.to_string().contains("ca-key.pem"), "{err}");
        let err = read_certs(&path).unwrap_err();
        assert!(err.to_string().contains("ca-key.pem"), "{err}");
    }

    fn base64_lines(bytes: &[u8]) -> String {
        const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut out = String::new();
        for chunk in bytes.chunks(3) {
            let n = chunk
                .iter()
                .enumerate()
                .fold(0u32, |acc, (i, b)| acc | u32::from(*b) << (16 - 8 * i));
            for i in 0..4 {
                if i <= chunk.len() {
                    out.push(ALPHABET[(n >> (18 - 6 * i) & 0x3f) as usize] as char);
                } else {
                    out.push('=');
                }
            }
        }
        out.as_bytes()
            .chunks(64)
            .map(|line| format!("{}\n", String::from_utf8_lossy(line)))
            .collect()
    }
}
