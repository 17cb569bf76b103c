module github.com/mediacache/mediacache/clients/go

// The oldest releases this builds and is tested with (Debian's packages, offline); newer ones
// work too.
go 1.19

require (
	google.golang.org/grpc v1.33.3
	google.golang.org/protobuf v1.28.1
)
