//! grpc (skeleton).
