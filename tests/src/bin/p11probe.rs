//! An attacker's PKCS#11 probe for the custody tests (tests/tests/custody.rs):
//! what someone who holds the user PIN can do to the token directly, past
//! the daemon. It talks to the real module (SoftHSM2 in the tests) through
//! cryptoki; each run is its own process, because a module reads its
//! configuration (`SOFTHSM2_CONF`) once per process.
//!
//! ```text
//! p11probe MODULE TOKEN_LABEL PIN_FILE plant LABEL        a key imported by value (C_CreateObject)
//! p11probe MODULE TOKEN_LABEL PIN_FILE generate LABEL HEX_ID   a key generated in the token
//! p11probe MODULE TOKEN_LABEL PIN_FILE destroy LABEL
//! p11probe MODULE TOKEN_LABEL PIN_FILE id LABEL          prints CKA_ID in hex
//! p11probe MODULE TOKEN_LABEL PIN_FILE extract MK_LABEL WRAPPED_B64
//! ```
//! `extract` tries every way the probe knows to get a stored KEK out of the
//! token in plaintext, and prints one line per attempt: `NAME: refused
//! (REASON)` or `NAME: SUCCEEDED ...`.

use base64::Engine;
use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::types::AuthPin;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 6 {
        eprintln!("usage: p11probe MODULE TOKEN_LABEL PIN_FILE COMMAND ARGS...");
        std::process::exit(2);
    }
    let pkcs11 = Pkcs11::new(&args[1]).expect("load module");
    pkcs11.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)).expect("C_Initialize");
    let slot = pkcs11
        .get_slots_with_initialized_token()
        .expect("slots")
        .into_iter()
        .find(|s| pkcs11.get_token_info(*s).map(|i| i.label().trim_end() == args[2]).unwrap_or(false))
        .expect("token");
    let session = pkcs11.open_rw_session(slot).expect("session");
    let pin = std::fs::read_to_string(&args[3]).expect("pin file");
    session.login(UserType::User, Some(&AuthPin::new(pin.trim().into()))).expect("login");
    match args[4].as_str() {
        "plant" => {
            session.create_object(&secret_key_by_value(&args[5])).expect("C_CreateObject");
            println!("planted {}", args[5]);
        }
        "generate" => {
            let id = hex_decode(&args[6]);
            session.generate_key(&Mechanism::AesKeyGen, &generated_key(&args[5], id)).expect("C_GenerateKey");
            println!("generated {}", args[5]);
        }
        "destroy" => {
            for h in find(&session, &args[5]) {
                session.destroy_object(h).expect("C_DestroyObject");
            }
            println!("destroyed {}", args[5]);
        }
        "id" => {
            let h = one(&session, &args[5]);
            let attrs = session.get_attributes(h, &[AttributeType::Id]).expect("CKA_ID");
            let id = attrs.into_iter().find_map(|a| if let Attribute::Id(v) = a { Some(v) } else { None });
            println!("{}", id.unwrap_or_default().iter().map(|b| format!("{b:02x}")).collect::<String>());
        }
        "extract" => {
            let wrapped = base64::engine::general_purpose::STANDARD.decode(&args[6]).expect("base64");
            extract(&session, one(&session, &args[5]), &wrapped);
        }
        other => panic!("unknown command {other}"),
    }
}

fn find(session: &Session, label: &str) -> Vec<ObjectHandle> {
    session.find_objects(&[Attribute::Label(label.as_bytes().to_vec())]).expect("C_FindObjects")
}

fn one(session: &Session, label: &str) -> ObjectHandle {
    *find(session, label).first().unwrap_or_else(|| panic!("no object labelled {label}"))
}

/// An AES key whose value the attacker chose (32 × 0x41), with the
/// attributes a master key is checked for (sensitive, not extractable).
fn secret_key_by_value(label: &str) -> Vec<Attribute> {
    vec![
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::AES),
        Attribute::Value(vec![0x41; 32]),
        Attribute::Label(label.as_bytes().to_vec()),
        Attribute::Token(true),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::Wrap(true),
        Attribute::Unwrap(true),
    ]
}

/// A key generated in the token, with every attribute a master key is
/// checked for, but no unwrap template.
fn generated_key(label: &str, id: Vec<u8>) -> Vec<Attribute> {
    vec![
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::AES),
        Attribute::ValueLen(32.into()),
        Attribute::Label(label.as_bytes().to_vec()),
        Attribute::Id(id),
        Attribute::Token(true),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::Wrap(true),
        Attribute::Unwrap(true),
    ]
}

fn aes(sensitive: bool, extractable: bool) -> Vec<Attribute> {
    vec![
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::AES),
        Attribute::Token(false),
        Attribute::Sensitive(sensitive),
        Attribute::Extractable(extractable),
    ]
}

fn report<T>(name: &str, r: Result<T, cryptoki::error::Error>, ok: impl FnOnce(T) -> String) {
    match r {
        Ok(v) => println!("{name}: SUCCEEDED {}", ok(v)),
        Err(e) => println!("{name}: refused ({e})"),
    }
}

fn value_of(session: &Session, h: ObjectHandle) -> String {
    match session.get_attributes(h, &[AttributeType::Value]) {
        Ok(a) if a.iter().any(|a| matches!(a, Attribute::Value(v) if !v.is_empty())) => {
            "value readable".into()
        }
        Ok(_) => "value not returned".into(),
        Err(e) => format!("value refused ({e})"),
    }
}

fn extract(session: &Session, mk: ObjectHandle, wrapped: &[u8]) {
    let kw = Mechanism::AesKeyWrap;
    report("unwrap-plain", session.unwrap_key(&kw, mk, wrapped, &aes(false, true)), |h| value_of(session, h));
    report("unwrap-extractable", session.unwrap_key(&kw, mk, wrapped, &aes(true, true)), |_| {
        "extractable copy".into()
    });
    let pad = Mechanism::AesKeyWrapPad;
    report("unwrap-pad-plain", session.unwrap_key(&pad, mk, wrapped, &aes(false, true)), |h| {
        value_of(session, h)
    });
    let mut generic = aes(false, true);
    generic[1] = Attribute::KeyType(KeyType::GENERIC_SECRET);
    report("unwrap-generic", session.unwrap_key(&kw, mk, wrapped, &generic), |h| value_of(session, h));
    let mut derivable = aes(true, false);
    derivable.push(Attribute::Derive(true));
    report("unwrap-derivable", session.unwrap_key(&kw, mk, wrapped, &derivable), |_| {
        "a copy that derives (CKM_CONCATENATE_BASE_AND_DATA would copy its bits where the token has it)"
            .into()
    });
    let mut as_token = aes(true, true);
    as_token[2] = Attribute::Token(true);
    report("unwrap-token-object", session.unwrap_key(&kw, mk, wrapped, &as_token), |_| "token copy".into());
    report("decrypt-with-master-key", session.decrypt(&Mechanism::AesEcb, mk, wrapped), |_| {
        "decrypted".into()
    });
    // The template the master key allows: the control (this must work, or
    // the refusals above prove nothing), then what a confined copy allows.
    let confined = [
        aes(true, false),
        vec![
            Attribute::Wrap(false),
            Attribute::Unwrap(false),
            Attribute::Private(true),
            Attribute::Encrypt(true),
            Attribute::Decrypt(true),
            Attribute::Derive(false),
        ],
    ]
    .concat();
    let kek = match session.unwrap_key(&kw, mk, wrapped, &confined) {
        Ok(h) => {
            println!("control-confined-unwrap: ok");
            h
        }
        Err(e) => {
            println!("control-confined-unwrap: failed ({e})");
            return;
        }
    };
    let mine = session
        .create_object(&[
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(KeyType::AES),
            Attribute::Value(vec![0x42; 32]),
            Attribute::Token(false),
            Attribute::Wrap(true),
        ])
        .expect("a wrapping key of the attacker's");
    report("wrap-under-own-key", session.wrap_key(&kw, mine, kek), |_| "wrapped under a known key".into());
    report("set-extractable", session.update_attributes(kek, &[Attribute::Extractable(true)]), |_| {
        "now extractable".into()
    });
    report("set-not-sensitive", session.update_attributes(kek, &[Attribute::Sensitive(false)]), |_| {
        "now readable".into()
    });
    report("copy-extractable", session.copy_object(kek, &[Attribute::Extractable(true)]), |_| {
        "extractable copy".into()
    });
    match value_of(session, kek) {
        v if v == "value readable" => println!("read-value: SUCCEEDED {v}"),
        v => println!("read-value: refused ({v})"),
    }
}

fn hex_decode(s: &str) -> Vec<u8> {
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex")).collect()
}
