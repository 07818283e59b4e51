// Package monitoring pins the prometheus-operator API types whose CRDs controller-gen
// generates (see go.mod).
package monitoring

import _ "github.com/prometheus-operator/prometheus-operator/pkg/apis/monitoring/v1"
