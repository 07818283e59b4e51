# rdphealth-script: repair-enable-tls12 v1
# Targeted repair for "TLS disabled for the server" (Schannel event 36871, TLS handshake
# failures): enables TLS 1.2 for the SCHANNEL server side. TLS 1.0 and 1.1 are deliberately
# NOT enabled: that would weaken security. SCHANNEL reads these keys at boot, so the output
# asks for a restart.
$ErrorActionPreference = 'Stop'
try {
    $key = 'HKLM:\SYSTEM\CurrentControlSet\Control\SecurityProviders\SCHANNEL\Protocols\TLS 1.2\Server'
    $before = Get-ItemProperty -Path $key -ErrorAction SilentlyContinue
    "RDPHEALTH before name=Enabled value=$($before.Enabled) name2=DisabledByDefault value2=$($before.DisabledByDefault)"
    New-Item -Path $key -Force | Out-Null
    New-ItemProperty -Path $key -Name 'Enabled' -Value 1 -PropertyType DWord -Force | Out-Null
    New-ItemProperty -Path $key -Name 'DisabledByDefault' -Value 0 -PropertyType DWord -Force | Out-Null
    'RDPHEALTH changed key="SCHANNEL\Protocols\TLS 1.2\Server" Enabled=1 DisabledByDefault=0'
    'RDPHEALTH result status=ok restart=required'
} catch {
    "RDPHEALTH result status=failed detail=`"$($_.Exception.Message)`""
}
