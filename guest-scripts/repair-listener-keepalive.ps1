# rdphealth-script: repair-listener-keepalive v1
# Targeted repair for frequent disconnects (a misconfigured RDP listener, typical of custom
# images): keep-alive, reconnect and session-limit settings from the intermittent-connectivity
# guide. The two settings that weaken security (SecurityLayer=0, MinEncryptionLevel=1) are
# applied only with -AllowInsecureListenerSettings, which the operator passes only when the
# RdpHealth spec sets allowInsecureListenerSettings: true.
param([string]$AllowInsecureListenerSettings = 'false')
$ErrorActionPreference = 'Stop'
function Set-Dword($Path, $Name, $Value) {
    New-Item -Path $Path -Force -ErrorAction SilentlyContinue | Out-Null
    New-ItemProperty -Path $Path -Name $Name -Value $Value -PropertyType DWord -Force | Out-Null
    "RDPHEALTH changed name=$Name value=$Value"
}
try {
    $rdpTcp = 'HKLM:\SYSTEM\CurrentControlSet\Control\Terminal Server\WinStations\RDP-Tcp'
    $policy = 'HKLM:\SOFTWARE\Policies\Microsoft\Windows NT\Terminal Services'
    Set-Dword $rdpTcp 'KeepAliveTimeout' 1
    Set-Dword $policy 'KeepAliveEnable' 1
    Set-Dword $policy 'KeepAliveInterval' 1
    Set-Dword $policy 'fDisableAutoReconnect' 0
    Set-Dword $rdpTcp 'fQueryUserConfigFromLocalMachine' 1
    Set-Dword $rdpTcp 'fInheritReconnectSame' 0
    Set-Dword $rdpTcp 'fReconnectSame' 1
    Set-Dword $rdpTcp 'fInheritMaxSessionTime' 1
    Set-Dword $rdpTcp 'fInheritMaxDisconnectionTime' 1
    Set-Dword $rdpTcp 'MaxDisconnectionTime' 0
    Set-Dword $rdpTcp 'MaxConnectionTime' 0
    Set-Dword $rdpTcp 'fInheritMaxIdleTime' 1
    Set-Dword $rdpTcp 'MaxIdleTime' 0
    Set-Dword $rdpTcp 'MaxInstanceCount' 4294967295
    if ($AllowInsecureListenerSettings -eq 'true') {
        Set-Dword $rdpTcp 'SecurityLayer' 0
        Set-Dword $rdpTcp 'MinEncryptionLevel' 1
        'RDPHEALTH warning insecure=applied detail="SecurityLayer=0 and MinEncryptionLevel=1 weaken RDP security"'
    }
    'RDPHEALTH result status=ok restart=required'
} catch {
    "RDPHEALTH result status=failed detail=`"$($_.Exception.Message)`""
}
