//! The CNI side of ZDS, what istio-cni's node agent does: listen on the SEQPACKET socket, accept
//! ztund, read its hello, send the snapshot (Add with the netns fd, Keep, SnapshotSent) and then
//! Add/Del as pods come and go, each waiting for its Ack. Used by tests and `ztund pod add|del`;
//! it decides nothing about which pods exist.

use std::os::fd::{AsFd, BorrowedFd};
use std::path::{Path, PathBuf};

use prost::Message;

use super::pods::PodInfo;
use super::seqpacket::{SeqPacket, SeqPacketListener};
use super::zds::ZdsError;
use super::zds::proto::{self, workload_request::Payload as Request};
use crate::net::Netns;

/// An error Ack from ztund: its text as it came over the wire (ZDS carries no error codes).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct AckRefusal(pub String);

/// A listening ZDS socket.
pub struct CniServer {
    listener: SeqPacketListener,
    path: PathBuf,
}

/// One entry of the snapshot the CNI sends after the hello.
#[derive(Debug, Clone, Copy)]
pub enum SnapshotPod<'a> {
    Add(&'a PodInfo, &'a Netns),
    Keep(&'a str),
}

impl CniServer {
    /// Listens at `path`, replacing a stale socket file.
    pub fn bind(path: &Path) -> Result<CniServer, ZdsError> {
        let listener = SeqPacketListener::bind(path).map_err(|source| ZdsError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Ok(CniServer {
            listener,
            path: path.to_path_buf(),
        })
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Waits for ztund to connect and say hello.
    pub async fn accept(&self) -> Result<CniConnection, ZdsError> {
        let socket = self
            .listener
            .accept()
            .await
            .map_err(|source| ZdsError::Io {
                path: self.path.display().to_string(),
                source,
            })?;
        let connection = CniConnection {
            socket,
            path: self.path.display().to_string(),
        };
        let packet = connection.recv_packet().await?;
        let hello =
            proto::ZdsHello::decode(packet.as_slice()).map_err(|source| ZdsError::Decode {
                message: "ZdsHello",
                source,
            })?;
        if hello.version != proto::Version::V1 as i32 {
            return Err(ZdsError::Version(hello.version));
        }
        Ok(connection)
    }
}

/// A connection to one ztund, after its hello.
pub struct CniConnection {
    socket: SeqPacket,
    path: String,
}

impl CniConnection {
    /// Sends the whole snapshot, then SnapshotSent; stops at the first refusal.
    pub async fn send_snapshot(&self, pods: &[SnapshotPod<'_>]) -> Result<(), ZdsError> {
        for pod in pods {
            match pod {
                SnapshotPod::Add(info, netns) => self.add(info, netns).await?,
                SnapshotPod::Keep(uid) => self.keep(uid).await?,
            }
        }
        self.snapshot_sent().await
    }

    /// Hands a pod and its namespace to ztund.
    pub async fn add(&self, pod: &PodInfo, netns: &Netns) -> Result<(), ZdsError> {
        let request = Request::Add(proto::AddWorkload {
            uid: pod.uid.clone(),
            workload_info: Some(proto::WorkloadInfo {
                name: pod.name.clone(),
                namespace: pod.namespace.clone(),
                service_account: pod.service_account.clone(),
            }),
        });
        self.request(request, &[netns.as_fd()], &format!("Add {}", pod.uid))
            .await
    }

    /// Snapshot only: a pod whose namespace cannot be opened.
    pub async fn keep(&self, uid: &str) -> Result<(), ZdsError> {
        let request = Request::Keep(proto::KeepWorkload { uid: uid.into() });
        self.request(request, &[], &format!("Keep {uid}")).await
    }

    /// The pod is gone.
    pub async fn del(&self, uid: &str) -> Result<(), ZdsError> {
        let request = Request::Del(proto::DelWorkload { uid: uid.into() });
        self.request(request, &[], &format!("Del {uid}")).await
    }

    /// Ends the snapshot.
    pub async fn snapshot_sent(&self) -> Result<(), ZdsError> {
        let request = Request::SnapshotSent(proto::SnapshotSent {});
        self.request(request, &[], "SnapshotSent").await
    }

    /// Sends arbitrary bytes and fds and returns the Ack's verdict (`Err` for an error Ack).
    /// For conformance tests of malformed requests.
    pub async fn send_raw(
        &self,
        bytes: &[u8],
        fds: &[BorrowedFd<'_>],
    ) -> Result<Result<(), AckRefusal>, ZdsError> {
        self.socket.send(bytes, fds).await.map_err(|e| self.io(e))?;
        self.recv_ack().await
    }

    async fn request(
        &self,
        request: Request,
        fds: &[BorrowedFd<'_>],
        what: &str,
    ) -> Result<(), ZdsError> {
        let bytes = proto::WorkloadRequest {
            payload: Some(request),
        }
        .encode_to_vec();
        self.send_raw(&bytes, fds)
            .await?
            .map_err(|AckRefusal(error)| ZdsError::Refused {
                request: what.to_string(),
                error,
            })
    }

    async fn recv_ack(&self) -> Result<Result<(), AckRefusal>, ZdsError> {
        let packet = self.recv_packet().await?;
        let response = proto::WorkloadResponse::decode(packet.as_slice()).map_err(|source| {
            ZdsError::Decode {
                message: "WorkloadResponse",
                source,
            }
        })?;
        match response.payload {
            Some(proto::workload_response::Payload::Ack(ack)) if ack.error.is_empty() => Ok(Ok(())),
            Some(proto::workload_response::Payload::Ack(ack)) => Ok(Err(AckRefusal(ack.error))),
            None => Err(ZdsError::EmptyResponse),
        }
    }

    /// Waits until ztund closes the connection (after a fatal protocol error).
    pub async fn closed(&self) -> Result<(), ZdsError> {
        match self.socket.recv().await.map_err(|e| self.io(e))? {
            None => Ok(()),
            Some(_) => Err(ZdsError::Io {
                path: self.path.clone(),
                source: std::io::Error::other("unexpected message from ztund"),
            }),
        }
    }

    async fn recv_packet(&self) -> Result<Vec<u8>, ZdsError> {
        match self.socket.recv().await.map_err(|e| self.io(e))? {
            None => Err(ZdsError::Closed),
            Some(packet) if packet.truncated => Err(ZdsError::Truncated),
            Some(packet) if !packet.fds.is_empty() => Err(ZdsError::UnexpectedFds {
                kind: "message from ztund",
                count: packet.fds.len(),
            }),
            Some(packet) => Ok(packet.bytes),
        }
    }

    fn io(&self, source: std::io::Error) -> ZdsError {
        ZdsError::Io {
            path: self.path.clone(),
            source,
        }
    }
}
