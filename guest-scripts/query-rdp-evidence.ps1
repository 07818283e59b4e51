# rdphealth-script: query-rdp-evidence v4
# Read-only. Collects what Microsoft's RDP troubleshooting guides ask to check in the guest:
# event-log entries of the last 24 hours for the RDP-relevant event IDs, the Remote Desktop
# services, the RDP-Tcp listener settings, SCHANNEL server protocol switches, the owner of the
# RDP port and the Remote Desktop firewall rule. Changes nothing.
# Output: one "RDPHEALTH <kind> key=value ..." line per fact, ending with "RDPHEALTH done".
# A fact that may legitimately be absent (no such event, service, value or rule) is read with
# -ErrorAction SilentlyContinue; any other error stops the script with "RDPHEALTH error" and
# exit code 1 (no "done" line: the evidence is incomplete).
# Run Command keeps only the last 4 KiB of output, so the output is kept short.
$ErrorActionPreference = 'Stop'
try {
    $since = (Get-Date).AddHours(-24)
    $events = @(
        @{ Log = 'System'; Provider = 'Microsoft-Windows-TerminalServices-RemoteConnectionManager'; Ids = @(1057, 1058) },
        @{ Log = 'System'; Provider = 'Schannel'; Ids = @(36870, 36871, 36872) },
        @{ Log = 'Microsoft-Windows-TerminalServices-SessionBroker/Operational'; Provider = 'Microsoft-Windows-TerminalServices-SessionBroker'; Ids = @(2056) },
        @{ Log = 'Microsoft-Windows-TerminalServices-SessionBroker-Client/Operational'; Provider = 'Microsoft-Windows-TerminalServices-SessionBroker-Client'; Ids = @(1296) }
    )
    foreach ($e in $events) {
        foreach ($id in $e.Ids) {
            # No matching event (or no such log without the broker role) is an error record.
            $n = @(Get-WinEvent -FilterHashtable @{ LogName = $e.Log; ProviderName = $e.Provider; Id = $id; StartTime = $since } -MaxEvents 100 -ErrorAction SilentlyContinue).Count
            if ($n -gt 0) { "RDPHEALTH event provider=$($e.Provider) id=$id count=$n" }
        }
    }

    foreach ($svc in 'TermService', 'SessionEnv', 'UmRdpService') {
        $s = Get-Service -Name $svc -ErrorAction SilentlyContinue
        if ($s) { "RDPHEALTH service name=$svc status=$($s.Status)" }
    }

    $ts = 'HKLM:\SYSTEM\CurrentControlSet\Control\Terminal Server'
    $rdpTcp = "$ts\WinStations\RDP-Tcp"
    "RDPHEALTH registry name=fDenyTSConnections value=$((Get-ItemProperty -Path $ts -ErrorAction SilentlyContinue).fDenyTSConnections)"
    $policy = (Get-ItemProperty -Path 'HKLM:\SOFTWARE\Policies\Microsoft\Windows NT\Terminal Services' -ErrorAction SilentlyContinue).fDenyTSConnections
    if ($null -ne $policy) { "RDPHEALTH registry name=PolicyfDenyTSConnections value=$policy" }
    $listener = Get-ItemProperty -Path $rdpTcp -ErrorAction SilentlyContinue
    foreach ($name in 'fEnableWinStation', 'PortNumber', 'SecurityLayer', 'UserAuthentication', 'MinEncryptionLevel') {
        "RDPHEALTH registry name=$name value=$($listener.$name)"
    }

    foreach ($version in 'TLS 1.0', 'TLS 1.1', 'TLS 1.2') {
        $key = "HKLM:\SYSTEM\CurrentControlSet\Control\SecurityProviders\SCHANNEL\Protocols\$version\Server"
        $values = Get-ItemProperty -Path $key -ErrorAction SilentlyContinue
        # A missing value means the operating system default: enabled, not disabled by default.
        $enabled = $values.Enabled
        if ($null -eq $enabled) { $enabled = 1 }
        $byDefault = $values.DisabledByDefault
        if ($null -eq $byDefault) { $byDefault = 0 }
        "RDPHEALTH tls name=`"$version`" enabled=$([int]($enabled -ne 0)) disabledByDefault=$([int]($byDefault -ne 0))"
    }

    $port = [int]$listener.PortNumber
    if ($port -eq 0) { $port = 3389 }
    $owner = ''
    $conn = Get-NetTCPConnection -State Listen -LocalPort $port -ErrorAction SilentlyContinue | Select-Object -First 1
    if ($conn) {
        $svc = Get-CimInstance Win32_Service -Filter "ProcessId = $($conn.OwningProcess)" | Where-Object Name -eq 'TermService'
        if ($svc) { $owner = 'TermService' } else { $owner = (Get-Process -Id $conn.OwningProcess).ProcessName }
    }
    "RDPHEALTH port port=$port owner=$owner"

    # A custom certificate binding must name a certificate in the store (event-ID guide).
    $binding = $listener.SSLCertificateSHA1Hash
    if ($null -ne $binding) {
        $thumbprint = ([BitConverter]::ToString([byte[]]$binding)).Replace('-', '')
        $found = @(Get-ChildItem -LiteralPath 'Cert:\LocalMachine\My', 'Cert:\LocalMachine\Remote Desktop' | Where-Object { $_.Thumbprint -eq $thumbprint })
        "RDPHEALTH certificate binding=$thumbprint present=$([int]($found.Count -gt 0))"
    } else {
        # Without a binding RDP uses the self-signed certificate in 'Remote Desktop': present
        # but without its private key, or expired, it cannot be used ("internal error" guide).
        $now = Get-Date
        foreach ($c in @(Get-ChildItem -LiteralPath 'Cert:\LocalMachine\Remote Desktop' -ErrorAction SilentlyContinue | Select-Object -First 3)) {
            "RDPHEALTH rdpcert thumbprint=$($c.Thumbprint) privateKey=$([int]$c.HasPrivateKey) expired=$([int]($c.NotAfter -lt $now))"
        }
    }

    $rule = Get-NetFirewallRule -Name 'RemoteDesktop-UserMode-In-TCP' -ErrorAction SilentlyContinue
    if ($rule) {
        $rulePort = ($rule | Get-NetFirewallPortFilter).LocalPort
        "RDPHEALTH firewall rule=RemoteDesktop-UserMode-In-TCP enabled=$($rule.Enabled) port=$rulePort"
    }

    'RDPHEALTH done'
} catch {
    "RDPHEALTH error detail=`"$($_.Exception.Message.Replace('"', "'"))`""
    exit 1
}
